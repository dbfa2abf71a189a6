//! A PostgreSQL database made for one bench run on the local server (127.0.0.1:5432, user
//! `postgres`, trust auth), created and dropped with `psql` so that a bench never touches a
//! database it did not make.

use std::process::Command;

use anyhow::{Context as _, bail};

const PG_HOST: &str = "127.0.0.1";
const PG_PORT: &str = "5432";
const PG_USER: &str = "postgres";

/// A fresh `conclave_bench_<uuid>` database, dropped (`WITH (FORCE)`) when this goes out of
/// scope, even when the run fails.
pub struct ScratchDatabase {
    name: String,
}

fn psql(sql: &str) -> anyhow::Result<()> {
    let output = Command::new("psql")
        .args([
            "-h", PG_HOST, "-p", PG_PORT, "-U", PG_USER, "-d", "postgres",
        ])
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .context("running psql (is the PostgreSQL client installed?)")?;
    if !output.status.success() {
        bail!(
            "psql -c {sql:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

impl ScratchDatabase {
    pub fn create() -> anyhow::Result<Self> {
        let name = format!("conclave_bench_{}", uuid::Uuid::now_v7().simple());
        psql(&format!("CREATE DATABASE {name}"))?;
        Ok(Self { name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn url(&self) -> String {
        format!("postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/{}", self.name)
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        match psql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )) {
            Ok(()) => println!("dropped database {}", self.name),
            Err(err) => eprintln!("warning: could not drop database {}: {err:#}", self.name),
        }
    }
}
