//! The `mic` child process: started with its log read on a thread, killed and reaped on drop;
//! its memory and CPU time from `/proc`.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context as _, bail};
use serde_json::Value;

/// The `mic` child: killed and reaped on drop, whichever way the bench ends.
pub(crate) struct MicProcess {
    pub(crate) child: Child,
    log: Arc<Mutex<MicLog>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Drop for MicProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// What the bench keeps of mic's JSON log.
#[derive(Debug, Default)]
pub(crate) struct MicLog {
    pub(crate) synced: Option<Instant>,
    pub(crate) passes: usize,
    pub(crate) warnings: usize,
    /// The last lines, shown if mic dies.
    pub(crate) tail: Vec<String>,
}

/// User + system CPU seconds of a process, from `/proc/<pid>/stat`.
pub(crate) fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("parsing {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        fields
            .get(i)
            .with_context(|| format!("{path} has no field {}", i + 3))?
            .parse::<f64>()
            .with_context(|| format!("parsing field {} of {path}", i + 3))
    };
    // Linux reports in USER_HZ, 100 on every architecture podid targets.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

impl MicProcess {
    pub(crate) fn spawn(mut command: Command, log_file: Option<&Path>) -> anyhow::Result<Self> {
        let mut file = match log_file {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?,
            ),
            None => None,
        };
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting mic")?;
        let stderr = child.stderr.take().context("mic's stderr pipe")?;
        let log = Arc::new(Mutex::new(MicLog::default()));
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(file) = file.as_mut() {
                    use std::io::Write as _;
                    let _ = writeln!(file, "{line}");
                }
                let message = serde_json::from_str::<Value>(&line).ok();
                let text = message
                    .as_ref()
                    .and_then(|v| v.pointer("/fields/message"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let level = message
                    .as_ref()
                    .and_then(|v| v.get("level"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let mut log = sink.lock().unwrap_or_else(|p| p.into_inner());
                match text.as_str() {
                    "pass done" => log.passes += 1,
                    "caches synced; reconciling" => log.synced = Some(Instant::now()),
                    _ => {}
                }
                if level == "WARN" || level == "ERROR" {
                    log.warnings += 1;
                }
                log.tail.push(line);
                if log.tail.len() > 20 {
                    log.tail.remove(0);
                }
            }
        });
        Ok(Self {
            child,
            log,
            reader: Some(reader),
        })
    }

    pub(crate) fn log(&self) -> std::sync::MutexGuard<'_, MicLog> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails with mic's last log lines if it exited.
    pub(crate) fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait().context("polling mic")? {
            let tail = self.log().tail.join("\n");
            bail!("mic exited with {status}; its last log lines:\n{tail}");
        }
        Ok(())
    }

    /// (VmRSS, VmHWM) in KiB.
    pub(crate) fn memory(&self) -> anyhow::Result<(u64, u64)> {
        let path = format!("/proc/{}/status", self.child.id());
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .with_context(|| format!("{name} missing from {path}"))?;
            line.trim_start_matches(name)
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .with_context(|| format!("parsing {line:?}"))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }
}
