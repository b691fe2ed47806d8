//! A throwaway service for tests (a PostgreSQL server, a Kafka broker), run by a
//! script of the project's in a directory of its own: `SCRIPT watch DIR ARGS...` starts
//! it, prints its port and then waits until its standard input closes, when it stops
//! the service and removes the directory. The pipe is this process's, so the kernel
//! closes it however the test process ends (exit, panic, SIGKILL): no service
//! outlives its tests. `SCRIPT COMMAND DIR` does the rest (kill, restart, ...).

use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug)]
pub struct Watched {
    script: &'static str,
    dir: PathBuf,
    port: u16,
    watch: Child,
}

impl Watched {
    /// Starts a service with `script watch DIR ARGS...` in a new directory named after
    /// `name`; `what` names the service in errors ("PostgreSQL").
    pub fn start(
        script: &'static str,
        name: &str,
        what: &str,
        args: &[&str],
    ) -> Result<Watched, String> {
        let dir = unused_dir(name);
        let mut watch = script_command(script, "watch", &dir)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| format!("could not run {script}: {error}"))?;
        // The script closes its stdout and stderr once the service is ready (or it has
        // given up): read both to the end, stderr on a thread so that a long log (an
        // installation, a build) cannot fill the pipe while stdout is read.
        let mut stderr = watch.stderr.take().ok_or("stderr is not piped")?;
        let errors = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let mut stdout = String::new();
        if let Some(mut pipe) = watch.stdout.take() {
            let _ = pipe.read_to_string(&mut stdout);
        }
        let errors = errors.join().unwrap_or_default();
        match stdout.trim().parse() {
            Ok(port) => {
                // Such as "installing PostgreSQL": shown with the test's output.
                eprint!("{errors}");
                Ok(Watched {
                    script,
                    dir,
                    port,
                    watch,
                })
            }
            Err(_) => {
                let status = watch.wait().map(|status| status.to_string());
                Err(format!(
                    "{script} could not start {what} in {} ({}):\n{errors}",
                    dir.display(),
                    status.unwrap_or_else(|error| error.to_string())
                ))
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `script COMMAND DIR`; its error is its stderr.
    pub fn script(&self, command: &str) -> Result<(), String> {
        let output = script_command(self.script, command, &self.dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|error| format!("could not run {}: {error}", self.script))?;
        if output.status.success() {
            // Such as a graceful stop that had to kill.
            eprint!("{}", String::from_utf8_lossy(&output.stderr));
            Ok(())
        } else {
            Err(format!(
                "{} {command} {} failed ({}):\n{}",
                self.script,
                self.dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        // End of file on its standard input: the script stops the service and removes
        // its directory, the same way as when the test process is gone. Wait for it, so
        // that the service is gone when the drop returns.
        drop(self.watch.stdin.take());
        let _ = self.watch.wait();
    }
}

/// `bash SCRIPT COMMAND DIR`, in a process group of its own: a Ctrl-C at the terminal
/// ends the tests but must not interrupt a start or a stop half-way (nor a build or an
/// installation, which would then start again from scratch).
fn script_command(script: &str, command: &str, dir: &Path) -> Command {
    let mut process = Command::new("bash");
    process.arg(script).arg(command).arg(dir).process_group(0);
    process
}

/// A directory for a new service, in the temporary directory, that does not exist yet
/// (the script creates it).
fn unused_dir(name: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    loop {
        let dir = std::env::temp_dir().join(format!(
            "onex-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        if !dir.exists() {
            return dir;
        }
    }
}
