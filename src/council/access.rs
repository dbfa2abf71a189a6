//! Opening, reading and voting in councils, with the checks the socket and REST share.

use std::collections::BTreeMap;

use chrono::Utc;
use serde_json::Value;

use super::actor::CastBallot;
use super::model::{Council, CouncilRequest, CouncilState, CouncilView, Member, MemberSpec, Phase};
use crate::auth::Principal;
use crate::node::Node;
use crate::protocol::{CouncilId, ErrorCode, Refusal, SessionId};
use crate::store::CouncilRow;
use crate::tasks::PickWorkers;

fn unavailable(err: impl std::fmt::Display) -> Refusal {
    tracing::warn!(%err, "store unavailable for a council");
    Refusal::storage_unavailable()
}

/// Opens a council in `session`: its members are resolved (capabilities to the least-loaded
/// connected workers), its state saved, and its actor started. Answers with its id once durable.
pub async fn open(
    node: &Node,
    principal: &Principal,
    session: SessionId,
    request: CouncilRequest,
) -> Result<CouncilId, Refusal> {
    principal.check_write()?;
    principal.check_session(&session)?;
    let spec = request.validate()?;
    let mut members: Vec<Member> = Vec::new();
    for wanted in &spec.members {
        let found = match wanted {
            MemberSpec::Capability { capability, count } => node
                .scheduler
                .addr()
                .send(PickWorkers {
                    capability: capability.clone(),
                    count: usize::try_from(*count).unwrap_or(0),
                })
                .await
                .map_err(|_| Refusal::new(ErrorCode::Internal, "the scheduler is not running"))?
                .into_iter()
                .map(Member::agent)
                .collect(),
            MemberSpec::Worker { worker } => vec![Member::agent(worker.clone())],
            MemberSpec::User { user } => vec![Member::person(user)],
        };
        for member in found {
            if !members.contains(&member) {
                members.push(member);
            }
        }
    }
    let council = Council {
        id: CouncilId::generate(),
        session,
        question: spec.question,
        strategy: spec.strategy,
        rounds: spec.rounds,
        phase_timeout_s: spec.phase_timeout_s,
        quorum: spec.quorum,
        members,
        state: CouncilState::Deliberating,
        phase: Phase::Propose,
        round: 1,
        deadline: None,
        labels: BTreeMap::new(),
        proposals: BTreeMap::new(),
        finals: BTreeMap::new(),
        reviews: BTreeMap::new(),
        synthesis: None,
        chair: None,
        ballots: Vec::new(),
        waiting: BTreeMap::new(),
        decision: None,
        opened_by: principal.user.id.clone(),
        created_at: Utc::now(),
    };
    let row = CouncilRow {
        id: council.id.clone(),
        session: council.session.clone(),
        state: council.state.as_str(),
        data: serde_json::to_string(&council)
            .map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))?,
        created_at: council.created_at,
    };
    node.store.save_council(&row).await.map_err(unavailable)?;
    let id = council.id.clone();
    node.councils.start(council);
    Ok(id)
}

async fn load(node: &Node, principal: &Principal, id: &CouncilId) -> Result<Council, Refusal> {
    let data = node
        .store
        .council(id)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| Refusal::not_found(format!("no council {id}")))?;
    let council: Council = serde_json::from_str(&data)
        .map_err(|e| Refusal::new(ErrorCode::Internal, format!("council {id} is corrupt: {e}")))?;
    principal.check_session(&council.session)?;
    Ok(council)
}

/// A council as last saved, with the caller's own label if the caller is a labeled member.
pub async fn read(
    node: &Node,
    principal: &Principal,
    id: &CouncilId,
) -> Result<CouncilView, Refusal> {
    let council = load(node, principal, id).await?;
    let own = council
        .label_of(&Member::person(&principal.user.id).id)
        .map(str::to_owned);
    Ok(CouncilView {
        your_label: own,
        ..council.into()
    })
}

/// A person's ballot for the council's current phase.
pub async fn ballot(
    node: &Node,
    principal: &Principal,
    id: &CouncilId,
    phase: Phase,
    ballot: Value,
) -> Result<(), Refusal> {
    principal.check_write()?;
    let Some((session, addr)) = node.councils.live(id) else {
        return Err(not_running(node, principal, id).await);
    };
    principal.check_session(&session)?;
    match addr
        .send(CastBallot {
            user: principal.user.id.clone(),
            phase,
            ballot,
        })
        .await
    {
        Ok(answer) => answer,
        // It stopped between the lookup and the send: concluded, or crashed.
        Err(_) => Err(not_running(node, principal, id).await),
    }
}

/// Why a council has no actor to take a ballot: it is over, unknown, or restarting after a
/// crash (still deliberating in the store).
async fn not_running(node: &Node, principal: &Principal, id: &CouncilId) -> Refusal {
    match load(node, principal, id).await {
        Ok(council) if council.state == CouncilState::Deliberating => Refusal::new(
            ErrorCode::Conflict,
            format!("council {id} is restarting; send the ballot again shortly"),
        ),
        Ok(council) => Refusal::new(
            ErrorCode::Conflict,
            format!("council {id} is {}", council.state.as_str()),
        ),
        Err(refusal) => refusal,
    }
}
