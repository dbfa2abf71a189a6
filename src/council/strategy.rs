//! How a council decides: parsing ballots into valid or invalid ones, and the four strategies
//! with their documented tie-break. Pure functions, so every rule is unit-tested here.
//!
//! Answers are compared after normalizing: trimmed, lower-cased, runs of whitespace made one
//! space. Every strategy scores the distinct normalized answers:
//!
//! | strategy | score of an answer |
//! |---|---|
//! | `majority` | the members whose final answer it is |
//! | `borda` | rank points from every valid review: in a ranking of m labels, the i-th (from 0) gets m − i points, credited to that label's proposal |
//! | `confidence` | the confidence weights of the members whose final answer it is: stated confidence below 0.25 weighs 1, below 0.5 weighs 2, below 0.75 weighs 3, else 4; no confidence weighs 1 |
//! | `chair` | none: the chair's `council.synthesize` answer is the decision |
//!
//! **Tie-break.** When answers tie on the strategy's score, the next criteria decide, in this
//! order, skipping the strategy's own: `borda` points, then `confidence` weight, then `votes`,
//! then `lexicographic` (the smallest normalized answer). The decision records the first
//! criterion that separated them. Nothing depends on list order.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How the ballots are aggregated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    Majority,
    Borda,
    Confidence,
    Chair,
}

/// A member's answer to the question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    pub answer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence: Option<f64>,
}

/// A member's ranking of the others' proposals, best first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Review {
    pub ranking: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critique: Option<String>,
}

/// Longest answer accepted, in bytes.
const MAX_ANSWER: usize = 64 * 1024;

/// Reads a `council.propose` output (or a person's propose ballot).
pub fn parse_proposal(raw: &Value) -> Result<Proposal, String> {
    let proposal: Proposal = serde_json::from_value(raw.clone())
        .map_err(|e| format!("a proposal is {{\"answer\": text, \"confidence\"?: 0..1}}: {e}"))?;
    if normalize(&proposal.answer).is_empty() {
        return Err("the answer is empty".into());
    }
    if proposal.answer.len() > MAX_ANSWER {
        return Err(format!("the answer is longer than {MAX_ANSWER} bytes"));
    }
    if let Some(c) = proposal.confidence
        && !(0.0..=1.0).contains(&c)
    {
        return Err(format!("confidence {c} is outside 0..1"));
    }
    Ok(proposal)
}

/// Reads a `council.review` output: it may rank only the labels it was shown, each once, and
/// never `own`.
pub fn parse_review(raw: &Value, shown: &[String], own: Option<&str>) -> Result<Review, String> {
    let review: Review = serde_json::from_value(raw.clone())
        .map_err(|e| format!("a review is {{\"ranking\": [labels], \"critique\"?: text}}: {e}"))?;
    if review.ranking.is_empty() {
        return Err("the ranking is empty".into());
    }
    let mut seen = Vec::new();
    for label in &review.ranking {
        if Some(label.as_str()) == own {
            return Err(format!("a member may not rank its own proposal ({label})"));
        }
        if !shown.contains(label) {
            return Err(format!("unknown label {label:?}"));
        }
        if seen.contains(&label) {
            return Err(format!("label {label} is ranked twice"));
        }
        seen.push(label);
    }
    Ok(review)
}

/// Reads a `council.synthesize` output.
pub fn parse_synthesis(raw: &Value) -> Result<String, String> {
    parse_proposal(raw).map(|p| p.answer)
}

/// The form answers are compared in.
pub fn normalize(answer: &str) -> String {
    answer
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// The weight a stated confidence carries in the `confidence` strategy.
pub fn confidence_weight(confidence: Option<f64>) -> f64 {
    match confidence {
        None => 1.0,
        Some(c) if c < 0.25 => 1.0,
        Some(c) if c < 0.5 => 2.0,
        Some(c) if c < 0.75 => 3.0,
        Some(_) => 4.0,
    }
}

/// What the strategy decides from.
pub struct Ballots<'a> {
    /// Each member's final answer, by member.
    pub finals: &'a BTreeMap<String, Proposal>,
    /// Each label's proposal as reviewed (round 1).
    pub labeled: &'a BTreeMap<String, Proposal>,
    /// Every valid review.
    pub reviews: &'a [Review],
}

/// A strategy's outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tally {
    /// The winning answer as first written, or `None` when there was nothing to count.
    pub answer: Option<String>,
    /// The score of every normalized answer under the strategy.
    pub scores: BTreeMap<String, f64>,
    /// The weight each member's final answer carried.
    pub weights: BTreeMap<String, f64>,
    /// The criterion that broke a tie, if the top answers tied.
    pub tie_break: Option<&'static str>,
    /// Members whose final answer lost.
    pub dissent: Vec<String>,
}

fn criterion(name: &str, ballots: &Ballots<'_>) -> BTreeMap<String, f64> {
    let mut scores: BTreeMap<String, f64> = BTreeMap::new();
    match name {
        "votes" => {
            for p in ballots.finals.values() {
                *scores.entry(normalize(&p.answer)).or_default() += 1.0;
            }
        }
        "confidence" => {
            for p in ballots.finals.values() {
                *scores.entry(normalize(&p.answer)).or_default() += confidence_weight(p.confidence);
            }
        }
        "borda" => {
            for review in ballots.reviews {
                let m = review.ranking.len();
                for (i, label) in review.ranking.iter().enumerate() {
                    if let Some(p) = ballots.labeled.get(label) {
                        *scores.entry(normalize(&p.answer)).or_default() += (m - i) as f64;
                    }
                }
            }
        }
        _ => {}
    }
    scores
}

/// Decides by `strategy` (not `chair`, which the council asks its chair instead).
pub fn decide(strategy: Strategy, ballots: &Ballots<'_>) -> Tally {
    let primary = match strategy {
        Strategy::Majority | Strategy::Chair => "votes",
        Strategy::Borda => "borda",
        Strategy::Confidence => "confidence",
    };
    let scores = criterion(primary, ballots);
    let weights = ballots
        .finals
        .iter()
        .map(|(member, p)| {
            let w = if strategy == Strategy::Confidence {
                confidence_weight(p.confidence)
            } else {
                1.0
            };
            (member.clone(), w)
        })
        .collect();
    let best = scores.values().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut tied: Vec<String> = scores
        .iter()
        .filter(|(_, s)| **s == best)
        .map(|(a, _)| a.clone())
        .collect();
    let mut tie_break = None;
    if tied.len() > 1 {
        for next in ["borda", "confidence", "votes"] {
            if next == primary {
                continue;
            }
            let scores = criterion(next, ballots);
            let score = |a: &String| scores.get(a).copied().unwrap_or(0.0);
            let top = tied.iter().map(score).fold(f64::NEG_INFINITY, f64::max);
            let kept: Vec<String> = tied.iter().filter(|a| score(a) == top).cloned().collect();
            if kept.len() < tied.len() {
                tied = kept;
                if tied.len() == 1 {
                    tie_break = Some(next);
                    break;
                }
            }
        }
        if tied.len() > 1 {
            // BTreeMap order: the first is the lexicographically smallest.
            tied.truncate(1);
            tie_break = Some("lexicographic");
        }
    }
    let winner = tied.into_iter().next();
    finish(winner, scores, weights, tie_break, ballots)
}

/// The tally for a decided answer: its first spelling, and who dissented.
fn finish(
    winner: Option<String>,
    scores: BTreeMap<String, f64>,
    weights: BTreeMap<String, f64>,
    tie_break: Option<&'static str>,
    ballots: &Ballots<'_>,
) -> Tally {
    let spelled = |normal: &String| {
        ballots
            .finals
            .values()
            .chain(ballots.labeled.values())
            .find(|p| &normalize(&p.answer) == normal)
            .map_or_else(|| normal.clone(), |p| p.answer.clone())
    };
    let answer = winner.as_ref().map(spelled);
    let dissent = ballots
        .finals
        .iter()
        .filter(|(_, p)| winner.as_ref() != Some(&normalize(&p.answer)))
        .map(|(m, _)| m.clone())
        .collect();
    Tally {
        answer,
        scores,
        weights,
        tie_break,
        dissent,
    }
}

/// The tally when the chair's synthesis is the decision.
pub fn chair_decides(synthesis: String, ballots: &Ballots<'_>) -> Tally {
    let normal = normalize(&synthesis);
    let mut tally = finish(
        Some(normal),
        BTreeMap::new(),
        BTreeMap::new(),
        None,
        ballots,
    );
    tally.answer = Some(synthesis);
    tally
}

/// Whether every final answer is the same, after normalizing.
pub fn agree(finals: &BTreeMap<String, Proposal>) -> bool {
    let mut answers = finals.values().map(|p| normalize(&p.answer));
    match answers.next() {
        Some(first) => answers.all(|a| a == first),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(answer: &str, confidence: Option<f64>) -> Proposal {
        Proposal {
            answer: answer.into(),
            confidence,
        }
    }

    fn finals(entries: &[(&str, &str, Option<f64>)]) -> BTreeMap<String, Proposal> {
        entries
            .iter()
            .map(|(m, a, c)| ((*m).to_owned(), p(a, *c)))
            .collect()
    }

    fn review(labels: &[&str]) -> Review {
        Review {
            ranking: labels.iter().map(|l| (*l).to_owned()).collect(),
            critique: None,
        }
    }

    #[test]
    fn majority_counts_normalized_answers() {
        let f = finals(&[
            ("m1", "Yes", None),
            ("m2", "  yes ", None),
            ("m3", "No", None),
        ]);
        let tally = decide(
            Strategy::Majority,
            &Ballots {
                finals: &f,
                labeled: &f,
                reviews: &[],
            },
        );
        assert_eq!(tally.answer.as_deref(), Some("Yes"));
        assert_eq!(tally.dissent, ["m3"]);
        assert_eq!(tally.tie_break, None);
    }

    #[test]
    fn borda_sums_rank_points_per_proposal() {
        let labeled = finals(&[
            ("A", "alpha", None),
            ("B", "beta", None),
            ("C", "gamma", None),
        ]);
        let f = finals(&[
            ("m1", "alpha", None),
            ("m2", "beta", None),
            ("m3", "gamma", None),
        ]);
        // m1 (A) ranks B, C; m2 (B) ranks C, A; m3 (C) ranks B, A.
        let reviews = [
            review(&["B", "C"]),
            review(&["C", "A"]),
            review(&["B", "A"]),
        ];
        let tally = decide(
            Strategy::Borda,
            &Ballots {
                finals: &f,
                labeled: &labeled,
                reviews: &reviews,
            },
        );
        assert_eq!(tally.scores["beta"], 4.0);
        assert_eq!(tally.scores["gamma"], 3.0);
        assert_eq!(tally.scores["alpha"], 2.0);
        assert_eq!(tally.answer.as_deref(), Some("beta"));
        assert_eq!(tally.dissent, ["m1", "m3"]);
    }

    #[test]
    fn confidence_weighs_in_steps() {
        assert_eq!(confidence_weight(Some(0.1)), 1.0);
        assert_eq!(confidence_weight(Some(0.25)), 2.0);
        assert_eq!(confidence_weight(Some(0.6)), 3.0);
        assert_eq!(confidence_weight(Some(1.0)), 4.0);
        assert_eq!(confidence_weight(None), 1.0);
        // Two unsure members lose to one sure one.
        let f = finals(&[
            ("m1", "x", Some(0.1)),
            ("m2", "x", Some(0.2)),
            ("m3", "y", Some(0.9)),
        ]);
        let tally = decide(
            Strategy::Confidence,
            &Ballots {
                finals: &f,
                labeled: &f,
                reviews: &[],
            },
        );
        assert_eq!(tally.answer.as_deref(), Some("y"));
        assert_eq!(tally.weights["m3"], 4.0);
    }

    #[test]
    fn ties_break_by_borda_then_confidence_then_votes_then_lexicographic() {
        // Majority tie, broken by Borda points.
        let labeled = finals(&[("A", "x", None), ("B", "y", None)]);
        let f = finals(&[("m1", "x", None), ("m2", "y", None)]);
        let reviews = [review(&["B"]), review(&["B"])];
        let t = decide(
            Strategy::Majority,
            &Ballots {
                finals: &f,
                labeled: &labeled,
                reviews: &reviews,
            },
        );
        assert_eq!(
            (t.answer.as_deref(), t.tie_break),
            (Some("y"), Some("borda"))
        );
        // No reviews: broken by confidence.
        let f = finals(&[("m1", "x", Some(0.1)), ("m2", "y", Some(0.9))]);
        let t = decide(
            Strategy::Majority,
            &Ballots {
                finals: &f,
                labeled: &f,
                reviews: &[],
            },
        );
        assert_eq!(
            (t.answer.as_deref(), t.tie_break),
            (Some("y"), Some("confidence"))
        );
        // Confidence tie, broken by votes: two weight-1 members against one weight-2.
        let f = finals(&[
            ("m1", "x", Some(0.1)),
            ("m2", "x", Some(0.1)),
            ("m3", "y", Some(0.3)),
        ]);
        let t = decide(
            Strategy::Confidence,
            &Ballots {
                finals: &f,
                labeled: &f,
                reviews: &[],
            },
        );
        assert_eq!(
            (t.answer.as_deref(), t.tie_break),
            (Some("x"), Some("votes"))
        );
        // Nothing separates them: the smallest normalized answer, whatever the member order.
        for order in [
            [("m1", "Zeta"), ("m2", "alpha")],
            [("m1", "alpha"), ("m2", "Zeta")],
        ] {
            let f = finals(&order.map(|(m, a)| (m, a, None)));
            let t = decide(
                Strategy::Majority,
                &Ballots {
                    finals: &f,
                    labeled: &f,
                    reviews: &[],
                },
            );
            assert_eq!(
                (t.answer.as_deref(), t.tie_break),
                (Some("alpha"), Some("lexicographic"))
            );
        }
    }

    #[test]
    fn invalid_ballots_are_refused_with_a_reason() {
        assert!(parse_proposal(&json!({"answer": "x", "confidence": 0.5})).is_ok());
        for bad in [
            json!({}),
            json!({"answer": "  "}),
            json!({"answer": 5}),
            json!({"answer": "x", "confidence": 2}),
            json!("x"),
        ] {
            assert!(parse_proposal(&bad).is_err(), "{bad}");
        }
        let shown = vec!["A".to_owned(), "C".to_owned()];
        assert!(parse_review(&json!({"ranking": ["C", "A"]}), &shown, Some("B")).is_ok());
        assert!(
            parse_review(&json!({"ranking": ["B"]}), &shown, Some("B"))
                .unwrap_err()
                .contains("own")
        );
        assert!(
            parse_review(&json!({"ranking": ["Z"]}), &shown, Some("B"))
                .unwrap_err()
                .contains("unknown")
        );
        assert!(parse_review(&json!({"ranking": ["A", "A"]}), &shown, None).is_err());
        assert!(parse_review(&json!({"ranking": []}), &shown, None).is_err());
    }

    #[test]
    fn chair_and_agreement() {
        let f = finals(&[("m1", "x", None), ("m2", "y", None)]);
        let t = chair_decides(
            "Y".into(),
            &Ballots {
                finals: &f,
                labeled: &f,
                reviews: &[],
            },
        );
        assert_eq!(
            (t.answer.as_deref(), t.dissent.clone()),
            (Some("Y"), vec!["m1".to_owned()])
        );
        assert!(!agree(&f));
        assert!(agree(&finals(&[
            ("m1", "Same ", None),
            ("m2", "same", None)
        ])));
        assert!(!agree(&BTreeMap::new()));
    }
}
