//! The compose testbed driven from a test: `scripts/testbed.sh` and
//! `docker-compose.yml` at the top of the repository, real containers.
//!
//! A [`Testbed`] is one compose project with a name and a /24 of its own,
//! so it never touches a testbed a developer keeps running; dropping it
//! (also on a panic) runs `testbed.sh down`, which removes its containers,
//! networks and volumes. The image must exist: `scripts/test.sh` builds it
//! with `scripts/testbed.sh build` before the tests run, because a test
//! cannot run cargo while cargo holds the build directory.
//!
//! ```text
//!  testbed/Dockerfile: host-built binaries on a Debian base (debootstrap + docker import: no registry)
//!   control-plane (file + docker sources, engine socket read-only, fixed address)
//!   node1..node3  (testbed/switchyard-node: pod resolv.conf naming the stub, agent with iptables,
//!                  Docker's embedded DNS as upstream)
//!   web           (switchyard-testbed-web, testbed/web/: answers with its host name)
//!   client        (node1's network namespace and resolv.conf)
//! ```
//!
//! One image runs every service; the control plane's fixed address means
//! nodes need neither DNS nor rules to reach it. Docker's own nat rules for
//! its embedded DNS (`DOCKER_OUTPUT`) sit in each node's nat table beside
//! ours; the agent only adds its jumps and `SWY-` chains, so both keep
//! working.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The environment variable that turns the testbed tests on.
pub const ENABLE: &str = "SWITCHYARD_TESTBED";

/// One testbed; see the module docs.
#[derive(Debug)]
pub struct Testbed {
    project: String,
    net: String,
    root: PathBuf,
    /// Containers started outside compose, removed on drop.
    extra: Vec<String>,
}

/// Longest any step of a testbed test may take.
pub const STEP: Duration = Duration::from_secs(60);

impl Testbed {
    /// Brings a testbed up with `scripts/testbed.sh up` (no cargo build),
    /// or returns `None` (with a message) when [`ENABLE`] is not set.
    pub fn up(project: &str, net: &str) -> Option<Self> {
        if std::env::var(ENABLE).as_deref() != Ok("1") {
            eprintln!(
                "skipping: {ENABLE}=1 not set (scripts/test.sh sets it when a Docker engine answers)"
            );
            return None;
        }
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("repository root")
            .to_owned();
        let tb = Self {
            project: project.to_owned(),
            net: net.to_owned(),
            root,
            extra: Vec::new(),
        };
        // A leftover of an interrupted run would hold the subnet.
        let _ = tb.script(&["down"]).output();
        let out = tb.script(&["up"]).output().expect("running testbed.sh up");
        assert!(
            out.status.success(),
            "scripts/testbed.sh up failed:\n{}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tb.logs(),
        );
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        Some(tb)
    }

    fn script(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.root.join("scripts/testbed.sh"));
        cmd.args(args)
            .env("COMPOSE_PROJECT_NAME", &self.project)
            .env("SWITCHYARD_NET", &self.net)
            .env("SWITCHYARD_NO_BUILD", "1")
            .current_dir(&self.root)
            .stdin(Stdio::null());
        cmd
    }

    /// The first three octets of the testbed's /24.
    pub fn net(&self) -> &str {
        &self.net
    }

    /// The compose project name.
    pub fn project(&self) -> &str {
        &self.project
    }

    /// `docker compose ARGS` (or docker-compose) for this project; must succeed.
    pub fn compose(&self, args: &[&str]) -> String {
        let mut full = vec!["compose"];
        full.extend_from_slice(args);
        let out = self.script(&full).output().expect("running compose");
        assert!(
            out.status.success(),
            "compose {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `docker ARGS`; returns the output whatever the exit status.
    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running docker")
    }

    /// Runs `sh -c CMD` in the compose service's (first) container; stdout.
    pub fn sh(&self, service: &str, cmd: &str) -> String {
        let out = self.exec(service, cmd);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `sh -c CMD` in the compose service's (first) container.
    pub fn exec(&self, service: &str, cmd: &str) -> Output {
        self.script(&["compose", "exec", "-T", service, "sh", "-c", cmd])
            .output()
            .expect("running compose exec")
    }

    /// Starts `sh -c CMD` in the service's container, stdout piped.
    pub fn spawn(&self, service: &str, cmd: &str) -> Child {
        self.script(&["compose", "exec", "-T", service, "sh", "-c", cmd])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting compose exec")
    }

    /// The control plane's `/status`, or `Null` while it cannot be read.
    pub fn status(&self) -> Value {
        serde_json::from_str(&self.sh("control-plane", "curl -fsS localhost:9901/status"))
            .unwrap_or(Value::Null)
    }

    /// A node's agent `/status`, or `Null` while it cannot be read.
    pub fn agent_status(&self, node: &str) -> Value {
        serde_json::from_str(&self.sh(node, "curl -fsS localhost:9902/status"))
            .unwrap_or(Value::Null)
    }

    /// The running containers of a compose service: (id, host name).
    pub fn containers(&self, service: &str) -> Vec<(String, String)> {
        let out = self.docker(&[
            "ps",
            "-q",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.project),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ]);
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(|id| {
                let h = self.docker(&["inspect", "-f", "{{.Config.Hostname}}", id]);
                (
                    id.to_owned(),
                    String::from_utf8_lossy(&h.stdout).trim().to_owned(),
                )
            })
            .collect()
    }

    /// The container id of a compose service with one container.
    pub fn container(&self, service: &str) -> String {
        let all = self.containers(service);
        assert_eq!(all.len(), 1, "{service}: {all:?}");
        all[0].0.clone()
    }

    /// `docker run -d ARGS` on the testbed network, removed on drop.
    pub fn run_extra(&mut self, name: &str, args: &[&str]) {
        let name = format!("{}_{name}", self.project);
        let network = format!("{}_testbed", self.project);
        let image = std::env::var("SWITCHYARD_IMAGE").unwrap_or_else(|_| "switchyard:dev".into());
        let mut full = vec![
            "run",
            "-d",
            "--init",
            "--name",
            &name,
            "--network",
            &network,
        ];
        full.extend_from_slice(args);
        full.push(&image);
        full.extend(["sleep", "infinity"]);
        let out = self.docker(&full);
        assert!(
            out.status.success(),
            "docker run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.extra.push(name);
    }

    /// Every service's logs (for failure messages).
    pub fn logs(&self) -> String {
        self.script(&["compose", "logs", "--no-color", "--tail", "40"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Polls `check` every 200 ms until it returns `Some`, for at most
    /// [`STEP`]; panics naming `what` (with the logs) otherwise. The
    /// containers' state can only be read by asking them.
    pub fn wait_for<T>(&self, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(v) = check() {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "waited {STEP:?} for {what}\ncontrol plane status: {}\n{}",
                    self.status(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for name in &self.extra {
            let _ = self.docker(&["rm", "-f", name]);
        }
        match self.script(&["down"]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "testbed.sh down failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("testbed.sh down: {e}"),
        }
    }
}
