//! Rebuilds the crate when a migration is added or changed. `sqlx::migrate!` embeds the
//! migration folders at compile time, and on stable Rust cargo cannot see that: without this, a
//! new migration file with no Rust change beside it would be left out of the binary.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
