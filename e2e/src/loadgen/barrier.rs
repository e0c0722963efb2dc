//! Phases shared by the processes of one run. One process cannot hold 100k
//! sockets (20k open files each), so a big run is several generator processes
//! that must ramp, measure and stop together: each phase starts once every
//! process has written its marker file into a shared directory.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;

pub struct Barrier {
    dir: Option<PathBuf>,
    procs: usize,
    index: usize,
    timeout: Duration,
}

impl Barrier {
    pub fn new(dir: Option<PathBuf>, procs: usize, index: usize, timeout: Duration) -> Self {
        Barrier {
            dir,
            procs,
            index,
            timeout,
        }
    }

    /// The leader samples the servers and Redis for the whole run.
    pub fn is_leader(&self) -> bool {
        self.index == 0
    }

    /// Waits until every process has reached the phase `name`.
    pub async fn wait(&self, name: &str) -> anyhow::Result<()> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating barrier dir {}", dir.display()))?;
        std::fs::write(dir.join(format!("{name}.{}", self.index)), b"")
            .with_context(|| format!("writing barrier marker in {}", dir.display()))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let reached = (0..self.procs)
                .filter(|i| dir.join(format!("{name}.{i}")).exists())
                .count();
            if reached == self.procs {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {reached} of {} processes reached phase {name} in {:?}",
                self.procs,
                self.timeout
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
