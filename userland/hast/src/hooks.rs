//! Event hooks: the `exec` program of hast.conf, run with the event's
//! arguments (`role <res> <old> <new>`, `connect <res>`, ...), never waited
//! for by the caller; its exit is logged, and published on the event
//! stream, when it happens. [`notify`] is where the daemon reports an
//! event: it goes on the event stream ([`crate::events`]) and, when it is
//! one the reference has a hook for, runs the hook.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::events::{self, HookEnd, Kind};

/// An event that runs the resource's `exec` hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// The role changed from `old` to `new`.
    Role { old: &'a str, new: &'a str },
    /// The connection to the peer is established.
    Connect,
    /// The connection to the peer was lost.
    Disconnect,
    /// Synchronization started.
    SyncStart,
    /// Synchronization finished (only when data was synchronized).
    SyncDone,
    /// Synchronization was interrupted.
    SyncIntr,
    /// Split-brain was detected.
    SplitBrain,
}

impl Event<'_> {
    /// The event name, the hook's first argument.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Role { .. } => "role",
            Event::Connect => "connect",
            Event::Disconnect => "disconnect",
            Event::SyncStart => "syncstart",
            Event::SyncDone => "syncdone",
            Event::SyncIntr => "syncintr",
            Event::SplitBrain => "split-brain",
        }
    }

    /// The full argument list after the program name.
    pub fn args(&self, resource: &str) -> Vec<String> {
        let mut args = vec![self.name().to_string(), resource.to_string()];
        if let Event::Role { old, new } = self {
            args.push((*old).to_string());
            args.push((*new).to_string());
        }
        args
    }
}

/// Report `kind` on `resource`: publish it on the event stream, then run
/// `program` (the resource's `exec`) for it when it is a hook event (role,
/// connect, disconnect, syncstart, syncdone, syncintr, split-brain).
pub fn notify(program: Option<&Path>, resource: &str, kind: Kind) {
    events::publish(resource, kind.clone());
    let event = match &kind {
        Kind::Role { old, new } => Event::Role {
            old: old.as_str(),
            new: new.as_str(),
        },
        Kind::Connect { .. } => Event::Connect,
        Kind::Disconnect { .. } => Event::Disconnect,
        Kind::SyncStart { .. } => Event::SyncStart,
        Kind::SyncDone { .. } => Event::SyncDone,
        Kind::SyncInterrupted { .. } => Event::SyncIntr,
        Kind::SplitBrain { .. } => Event::SplitBrain,
        Kind::SyncProgress { .. }
        | Kind::IoError { .. }
        | Kind::Timeout { .. }
        | Kind::Hook { .. } => return,
    };
    run(program, resource, &event);
}

/// Start `program` for `event` on `resource` (no-op when `program` is None).
/// The hook runs with standard input, output and error on /dev/null; a
/// background thread reaps it and logs how it ended. Failure to start it is
/// logged, never fatal.
pub fn run(program: Option<&Path>, resource: &str, event: &Event<'_>) {
    let Some(program) = program else {
        return;
    };
    let args = event.args(resource);
    let mut cmd = Command::new(program);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    match cmd.spawn() {
        Ok(mut child) => {
            let pid = child.id();
            tracing::debug!(resource, hook = %program.display(), pid, args = ?args, "hook started");
            let program = program.display().to_string();
            let resource = resource.to_string();
            let name = event.name();
            let spawned = std::thread::Builder::new()
                .name("hast-hook".into())
                .spawn(move || {
                    let end = match child.wait() {
                        Ok(status) if status.success() => {
                            tracing::debug!(resource, hook = %program, pid, "hook exited gracefully");
                            HookEnd::Exited(0)
                        }
                        Ok(status) => {
                            tracing::warn!(resource, hook = %program, pid, %status, args = ?args, "hook failed");
                            use std::os::unix::process::ExitStatusExt;
                            match (status.code(), status.signal()) {
                                (Some(code), _) => HookEnd::Exited(code),
                                (None, Some(sig)) => HookEnd::Killed(sig),
                                (None, None) => HookEnd::Failed(status.to_string()),
                            }
                        }
                        Err(e) => {
                            tracing::warn!(resource, hook = %program, pid, error = %e, "cannot wait for hook");
                            HookEnd::Failed(format!("cannot wait for it: {e}"))
                        }
                    };
                    events::publish(
                        &resource,
                        Kind::Hook {
                            hook: name.to_string(),
                            program,
                            pid: Some(pid),
                            end,
                        },
                    );
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a thread to reap the hook; it stays a zombie until exit");
            }
        }
        Err(e) => {
            tracing::error!(resource, hook = %program.display(), error = %e, "cannot execute hook {}", program.display());
            events::publish(
                resource,
                Kind::Hook {
                    hook: event.name().to_string(),
                    program: program.display().to_string(),
                    pid: None,
                    end: HookEnd::Failed(format!("cannot execute it: {e}")),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_event_arguments_are_the_references() {
        let ev = Event::Role {
            old: "init",
            new: "primary",
        };
        assert_eq!(ev.args("data"), ["role", "data", "init", "primary"]);
        assert_eq!(Event::SplitBrain.args("r"), ["split-brain", "r"]);
    }

    #[test]
    fn hook_runs_with_the_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = dir.path().join("hook.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$@\" > {}.tmp && mv {0}.tmp {0}\n",
                out.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        run(
            Some(&script),
            "disk0",
            &Event::Role {
                old: "secondary",
                new: "primary",
            },
        );
        // The hook runs on its own: wait for its whole line.
        let want = "role disk0 secondary primary\n";
        let mut got = String::new();
        for _ in 0..3000 {
            got = std::fs::read_to_string(&out).unwrap_or_default();
            if got == want {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(got, want);
    }
}
