//! Starts the real local stack for end-to-end tests: tansu (SQLite storage, fresh directory),
//! hfs (R5, in-memory, validation enforced), the Withings simulator, a fresh PostgreSQL
//! database, the topics, and the six stages as separate processes (so tests can SIGKILL and
//! restart them). Everything listens on 127.0.0.1 with free ports; children die with the stack.

use anyhow::{Context as _, bail};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

/// The six stages and their binaries.
pub const STAGES: &[&str] = &[
    "webhook-gateway",
    "fetcher",
    "hourly-aggregator",
    "fhir-mapper",
    "deduplicator",
    "publisher",
];

/// AES-256 key used by the tests (not a production key).
pub const TEST_SECRET_KEYS: &str = "test1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// A running child process.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    /// `host:port` of its HTTP endpoint.
    pub http: String,
}

/// The running stack.
#[derive(Debug)]
pub struct Stack {
    pub dir: PathBuf,
    pub bin_dir: PathBuf,
    pub kafka: String,
    pub fhir_base: String,
    pub db_url: String,
    pub sim_url: String,
    /// The Omron Wellness API simulator.
    pub omron_url: String,
    /// The Google Health API simulator (OAuth, API, keyset on one address).
    pub google_url: String,
    pub procs: HashMap<String, Proc>,
    /// Extra environment per stage (kept across restarts).
    pub stage_env: HashMap<String, Vec<(String, String)>>,
    /// Extra environment for every ohx process.
    pub extra_env: Vec<(String, String)>,
    pub http: reqwest::Client,
    /// The HTTP port each process name got first: a restarted process listens where it did.
    pub ports: HashMap<String, u16>,
    /// The SQLite database name of the broker (in `dir`), for restarts on the same data.
    pub tansu_db: String,
}

/// Stacks started by this process so far (names their directories and databases).
static STACK_RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Returns a free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_relative() => workspace_root().join(dir),
        Some(dir) => dir,
        None => workspace_root().join("target"),
    }
}

/// Where the binaries under test are: `OHX_BIN_DIR` (a relative one taken from the workspace
/// root, as the README's commands write it; the latency benchmark uses release builds), else
/// the debug build.
pub fn bin_dir() -> PathBuf {
    match std::env::var_os("OHX_BIN_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_relative() => workspace_root().join(dir),
        Some(dir) => dir,
        None => target_dir().join("debug"),
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

async fn wait_tcp(addr: &str, what: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{what} did not listen on {addr} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads a FHIR JSON document. hfs answers a read 503 "database table is locked" while a
/// transaction writes: that answer is retried for up to 10 s, like a client of a busy server.
pub async fn read_fhir(http: &reqwest::Client, url: &str, what: &str) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = http
            .get(url)
            .header("Accept", "application/fhir+json")
            .send()
            .await?;
        let status = r.status();
        let body = r.text().await?;
        if status.is_success() {
            return Ok(serde_json::from_str(&body)?);
        }
        if status != reqwest::StatusCode::SERVICE_UNAVAILABLE
            || tokio::time::Instant::now() > deadline
        {
            bail!("GET {what}: {status} {body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Options of a stack (benchmarks raise the simulated application's rate budget).
#[derive(Debug, Clone, Default)]
pub struct StackOptions {
    /// `--rate-limit-per-minute` of the simulator (0 = off); default: Withings' 120.
    pub sim_rate_limit_per_minute: Option<u32>,
    /// Extra environment for every stage.
    pub stage_env: Vec<(String, String)>,
}

/// Starts a tansu broker (SQLite storage) in `dir` on a free port; returns it and its address.
pub async fn spawn_tansu(dir: &Path, name: &str) -> anyhow::Result<(Child, String)> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let child = spawn_tansu_at(dir, name, &addr).await?;
    Ok((child, addr))
}

/// Starts a tansu broker on `addr` with the SQLite database `{dir}/{name}.db` (kept if it
/// exists: a restart on the same data).
pub async fn spawn_tansu_at(dir: &Path, name: &str, addr: &str) -> anyhow::Result<Child> {
    let tansu = which("tansu").context("tansu is not installed: run scripts/install-tools")?;
    std::fs::create_dir_all(dir.join("logs"))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("logs").join(format!("{name}.log")))?;
    let child = Command::new(tansu)
        .arg("broker")
        .arg("--listener-url")
        .arg(format!("tcp://{addr}"))
        .arg("--advertised-listener-url")
        .arg(format!("tcp://{addr}"))
        // tansu resolves the SQLite path relative to its working directory.
        .arg("--storage-engine")
        .arg(format!("sqlite://{name}.db"))
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start tansu")?;
    wait_tcp(addr, "tansu", Duration::from_secs(30)).await?;
    Ok(child)
}

impl Stack {
    /// Starts everything with default options.
    pub async fn start() -> anyhow::Result<Stack> {
        Self::start_with(StackOptions::default()).await
    }

    /// Starts everything. Needs `tansu` and `hfs` installed (scripts/install-tools), the
    /// workspace binaries built (`cargo build --workspace --bins`) and PostgreSQL on 5432.
    pub async fn start_with(options: StackOptions) -> anyhow::Result<Stack> {
        // One directory (and database) per stack: a test binary may start several in turn.
        let run = STACK_RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let run_name = if run == 0 {
            format!("{}", std::process::id())
        } else {
            format!("{}_{run}", std::process::id())
        };
        let dir = target_dir().join("e2e").join(format!("run-{run_name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("logs"))?;
        let bin_dir = bin_dir();
        for b in STAGES
            .iter()
            .chain(["ohx", "withings-sim", "omron-sim", "google-health-sim"].iter())
        {
            if !bin_dir.join(b).is_file() {
                bail!(
                    "{} is missing: run `cargo build --workspace --bins` first",
                    bin_dir.join(b).display()
                );
            }
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        let mut stack = Stack {
            dir: dir.clone(),
            bin_dir,
            kafka: String::new(),
            fhir_base: String::new(),
            db_url: String::new(),
            sim_url: String::new(),
            omron_url: String::new(),
            google_url: String::new(),
            procs: HashMap::new(),
            stage_env: HashMap::new(),
            extra_env: options.stage_env.clone(),
            http,
            ports: HashMap::new(),
            tansu_db: "tansu".into(),
        };

        // Broker: tansu with SQLite storage in a fresh directory.
        let (child, kafka) = spawn_tansu(&dir, "tansu").await?;
        stack.kafka = kafka.clone();
        stack
            .procs
            .insert("tansu".into(), Proc { child, http: kafka });

        // FHIR server: hfs, R5, in memory, validation enforced.
        stack.fhir_base = stack.start_hfs("hfs").await?;

        // Withings simulator.
        let sport = free_port()?;
        let mut cmd = Command::new(stack.bin_dir.join("withings-sim"));
        cmd.arg("--addr").arg(format!("127.0.0.1:{sport}"));
        if let Some(limit) = options.sim_rate_limit_per_minute {
            cmd.arg("--rate-limit-per-minute").arg(limit.to_string());
        }
        stack.sim_url = format!("http://127.0.0.1:{sport}");
        stack.spawn("withings-sim", cmd, format!("127.0.0.1:{sport}"))?;
        wait_tcp(
            &format!("127.0.0.1:{sport}"),
            "withings-sim",
            Duration::from_secs(30),
        )
        .await?;

        // Omron simulator.
        let oport = free_port()?;
        let mut cmd = Command::new(stack.bin_dir.join("omron-sim"));
        cmd.arg("--addr").arg(format!("127.0.0.1:{oport}"));
        stack.omron_url = format!("http://127.0.0.1:{oport}");
        stack.spawn("omron-sim", cmd, format!("127.0.0.1:{oport}"))?;
        wait_tcp(
            &format!("127.0.0.1:{oport}"),
            "omron-sim",
            Duration::from_secs(30),
        )
        .await?;

        // Google Health simulator.
        let gport = free_port()?;
        let mut cmd = Command::new(stack.bin_dir.join("google-health-sim"));
        cmd.arg("--addr").arg(format!("127.0.0.1:{gport}"));
        stack.google_url = format!("http://127.0.0.1:{gport}");
        stack.spawn("google-health-sim", cmd, format!("127.0.0.1:{gport}"))?;
        wait_tcp(
            &format!("127.0.0.1:{gport}"),
            "google-health-sim",
            Duration::from_secs(30),
        )
        .await?;

        // Database and topics.
        stack.db_url = format!("postgres://postgres@127.0.0.1:5432/ohx_e2e_{run_name}");
        stack.ohx(&["migrate"]).await?;
        stack.ohx(&["topics", "apply"]).await?;

        for s in STAGES {
            stack.start_stage(s).await?;
        }
        Ok(stack)
    }

    /// Starts an hfs (R5, in memory, validation enforced) named `name` on a free port and
    /// waits for it; returns its base URL.
    pub async fn start_hfs(&mut self, name: &str) -> anyhow::Result<String> {
        self.start_hfs_on(name, free_port()?, &[]).await
    }

    /// Starts an hfs like [`Stack::start_hfs`] on `hport` with extra environment (its
    /// `HFS_AUTH_*` settings, or `HFS_DEFAULT_FHIR_VERSION=R4` for an R4 server, for
    /// example); returns its base URL once it answers.
    pub async fn start_hfs_on(
        &mut self,
        name: &str,
        hport: u16,
        env: &[(&str, String)],
    ) -> anyhow::Result<String> {
        let hfs = which("hfs").context("hfs is not installed: run scripts/install-tools")?;
        let data_dir = std::env::var("HFS_DATA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/ohx/hfs-data")
            });
        // The version it serves: R5 unless `env` says otherwise (its data files are per version).
        let version = env
            .iter()
            .find(|(k, _)| *k == "HFS_DEFAULT_FHIR_VERSION")
            .map_or("r5".to_owned(), |(_, v)| v.to_lowercase());
        if !data_dir
            .join(format!("search-parameters-{version}.json"))
            .is_file()
        {
            bail!(
                "HFS data directory {} is missing: run scripts/install-tools",
                data_dir.display()
            );
        }
        let mut cmd = Command::new(hfs);
        cmd.arg("--port")
            .arg(hport.to_string())
            .arg("--host")
            .arg("127.0.0.1")
            .arg("--database-url")
            .arg(":memory:")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--log-level")
            .arg("warn")
            .env("HFS_DEFAULT_FHIR_VERSION", "R5")
            .env("HFS_VALIDATION_MODE", "enforce")
            .env("HFS_VALIDATION_META_PROFILES", "false")
            .env("HFS_UI_ENABLED", "false")
            // Its `next` links otherwise point at localhost:8080.
            .env("HFS_BASE_URL", format!("http://127.0.0.1:{hport}"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        let base = format!("http://127.0.0.1:{hport}");
        self.spawn(name, cmd, format!("127.0.0.1:{hport}"))?;
        self.wait_http(&format!("{base}/health"), name, Duration::from_secs(60))
            .await?;
        Ok(base)
    }

    /// Starts an hfs like [`Stack::start_hfs_on`] that takes only the JWT access tokens
    /// `authz` issues for it (scopes enforced, its SMART configuration naming `authz`'s token
    /// endpoint); returns its base URL.
    pub async fn start_hfs_enforcing(
        &mut self,
        name: &str,
        hport: u16,
        authz: &Authz,
    ) -> anyhow::Result<String> {
        let base = format!("http://127.0.0.1:{hport}");
        self.start_hfs_on(
            name,
            hport,
            &[
                ("HFS_AUTH_ENABLED", "true".into()),
                ("HFS_AUTH_JWKS_URL", authz.jwks_uri.clone()),
                ("HFS_AUTH_ISSUER", authz.issuer.clone()),
                ("HFS_AUTH_AUDIENCE", base),
                ("HFS_SMART_TOKEN_ENDPOINT", authz.token_endpoint.clone()),
            ],
        )
        .await
    }

    /// Starts the test authorization server (`tests/authz/server.mjs`: oidc-provider, the
    /// client credentials grant, JWT access tokens for `resource`) on `port` with `clients`
    /// (its clients file format) and waits for it; returns its issuer, token endpoint and
    /// JWKS URL. Needs `npm ci --prefix tests/authz` (scripts/install-tools runs it).
    pub async fn start_authz(
        &mut self,
        name: &str,
        port: u16,
        clients: &serde_json::Value,
        resource: &str,
        scopes: &str,
        token_ttl_s: u64,
    ) -> anyhow::Result<Authz> {
        self.start_authz_with(name, port, clients, resource, scopes, token_ttl_s, &[])
            .await
    }

    /// [`Stack::start_authz`] with more environment (e.g. `AUTHZ_USERS` and
    /// `AUTHZ_UI_CLIENT`: the interactive sign-in of the configuration UI).
    #[allow(clippy::too_many_arguments)]
    pub async fn start_authz_with(
        &mut self,
        name: &str,
        port: u16,
        clients: &serde_json::Value,
        resource: &str,
        scopes: &str,
        token_ttl_s: u64,
        env: &[(&str, String)],
    ) -> anyhow::Result<Authz> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("authz");
        if !dir.join("node_modules").is_dir() {
            bail!(
                "{}/node_modules is missing: run scripts/install-tools",
                dir.display()
            );
        }
        let clients_file = self.dir.join(format!("{name}-clients.json"));
        std::fs::write(&clients_file, serde_json::to_vec(clients)?)?;
        let mut cmd = Command::new("node");
        cmd.arg(dir.join("server.mjs"))
            .env("AUTHZ_PORT", port.to_string())
            .env("AUTHZ_CLIENTS", &clients_file)
            .env("AUTHZ_RESOURCE", resource)
            .env("AUTHZ_SCOPES", scopes)
            .env("AUTHZ_TOKEN_TTL", token_ttl_s.to_string())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        self.spawn(name, cmd, format!("127.0.0.1:{port}"))?;
        let issuer = format!("http://127.0.0.1:{port}");
        self.wait_http(&format!("{issuer}/jwks"), name, Duration::from_secs(60))
            .await?;
        Ok(Authz {
            token_endpoint: format!("{issuer}/token"),
            jwks_uri: format!("{issuer}/jwks"),
            issuer,
        })
    }

    /// Kills the broker (SIGKILL), without restarting it.
    pub async fn kill_broker(&mut self) -> anyhow::Result<()> {
        self.kill("tansu").await
    }

    /// Starts the broker again on the same address and the same SQLite data.
    pub async fn restart_broker(&mut self) -> anyhow::Result<()> {
        let child = spawn_tansu_at(&self.dir, &self.tansu_db, &self.kafka).await?;
        self.procs.insert(
            "tansu".into(),
            Proc {
                child,
                http: self.kafka.clone(),
            },
        );
        Ok(())
    }

    /// Returns the pid of a running process.
    pub fn pid_of(&self, name: &str) -> anyhow::Result<u32> {
        self.procs
            .get(name)
            .and_then(|p| p.child.id())
            .with_context(|| format!("{name} is not running"))
    }

    /// User + system CPU seconds a running process of the stack has used (`/proc/{pid}/stat`,
    /// 10 ms ticks); 0 if it is not running.
    pub fn cpu_seconds(&self, name: &str) -> f64 {
        self.pid_of(name)
            .map_or(0.0, |pid| cpu_seconds_of(&pid.to_string()))
    }

    /// Sends a signal (`STOP`, `CONT`, `TERM`...) to a running process.
    pub fn signal(&self, name: &str, signal: &str) -> anyhow::Result<()> {
        let pid = self.pid_of(name)?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{signal} {name} ({pid}) failed");
        }
        Ok(())
    }

    /// Name of replica `n` of a stage: the stage itself for 1, `{stage}#{n}` after.
    pub fn replica_name(stage: &str, n: u32) -> String {
        if n <= 1 {
            stage.to_string()
        } else {
            format!("{stage}#{n}")
        }
    }

    /// Starts replica `n` (2, 3...) of a stage: another process in the same consumer group,
    /// with its own HTTP port; waits until it is ready (holds an assignment).
    pub async fn start_replica(&mut self, stage: &str, n: u32) -> anyhow::Result<()> {
        let name = Self::replica_name(stage, n);
        self.spawn_stage(stage, &name)?;
        let url = format!("{}/readyz", self.http_of(&name)?);
        self.wait_http(&url, &name, Duration::from_secs(90)).await
    }

    /// Starts a process of `stage` named `name` without waiting for it; a restart listens on
    /// the port the name had before.
    pub fn spawn_stage(&mut self, stage: &str, name: &str) -> anyhow::Result<()> {
        let port = match self.ports.get(name) {
            Some(p) => *p,
            None => {
                let p = free_port()?;
                self.ports.insert(name.to_string(), p);
                p
            }
        };
        let mut cmd = Command::new(self.bin_dir.join(stage));
        cmd.envs(self.ohx_env())
            .env("OHX_HTTP_ADDR", format!("127.0.0.1:{port}"));
        if let Some(extra) = self.stage_env.get(stage) {
            cmd.envs(extra.iter().cloned());
        }
        self.spawn(name, cmd, format!("127.0.0.1:{port}"))
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit; SIGKILLs after that. Returns
    /// whether it exited by itself, and its exit status if so.
    pub async fn terminate(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let Some(mut p) = self.procs.remove(name) else {
            return Ok(None);
        };
        if let Some(pid) = p.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        match tokio::time::timeout(timeout, p.child.wait()).await {
            Ok(status) => Ok(Some(status?)),
            Err(_) => {
                p.child.kill().await?;
                Ok(None)
            }
        }
    }

    fn spawn(&mut self, name: &str, mut cmd: Command, http: String) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("logs").join(format!("{name}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        self.procs.insert(name.to_string(), Proc { child, http });
        Ok(())
    }

    /// Returns the environment every ohx process gets.
    pub fn ohx_env(&self) -> Vec<(String, String)> {
        vec![
            ("OHX_KAFKA_BOOTSTRAP".into(), self.kafka.clone()),
            ("OHX_DATABASE_URL".into(), self.db_url.clone()),
            ("OHX_SCHEMA_REGISTRY".into(), "embedded".into()),
            ("OHX_SECRET_KEYS".into(), TEST_SECRET_KEYS.into()),
            ("OHX_LOG".into(), "info".into()),
            ("OHX_IDENTIFIER_BASE".into(), "https://ohx.test/fhir".into()),
            ("OHX_LINGER_MS".into(), "5".into()),
            // tansu answers a fetch only at the end of the wait (see DEFAULT_FETCH_WAIT_MS).
            ("OHX_FETCH_WAIT_MS".into(), "50".into()),
            ("OHX_TICK_MS".into(), "250".into()),
            // Target configuration (keys, credentials) read again every 2 s (production: 60 s).
            ("OHX_TARGETS_TTL_MS".into(), "2000".into()),
            // Idle hours close 2 s after their last sample (production: 5 min).
            ("OHX_IDLE_GRACE_MS".into(), "2000".into()),
            // Pause 1 s after a provider rate limit (production: 60 s).
            ("OHX_RATE_LIMIT_PAUSE_MS".into(), "1000".into()),
        ]
        .into_iter()
        // The gateway's address, once it has one: the connect flow's callback and the
        // subscriptions it makes point there.
        .chain(
            self.ports
                .get("webhook-gateway")
                .map(|p| ("OHX_PUBLIC_URL".to_owned(), format!("http://127.0.0.1:{p}"))),
        )
        // Google's token endpoint and signing keys: the simulator's.
        .chain(
            [
                ("OHX_GOOGLE_HEALTH_TOKEN_URL", self.google_url.clone()),
                (
                    "OHX_GOOGLE_HEALTH_KEYSET_URL",
                    format!(
                        "{}/googlehealthapi/webhooks/webhooks_public_keyset.json",
                        self.google_url
                    ),
                ),
            ]
            .into_iter()
            .filter(|_| !self.google_url.is_empty())
            .map(|(k, v)| (k.to_owned(), v)),
        )
        .chain(self.extra_env.iter().cloned())
        .collect()
    }

    /// Starts (or restarts) a stage with the stack's environment plus its extra environment.
    pub async fn start_stage(&mut self, stage: &str) -> anyhow::Result<()> {
        self.spawn_stage(stage, stage)?;
        let url = format!("{}/readyz", self.http_of(stage)?);
        self.wait_http(&url, stage, Duration::from_secs(90)).await
    }

    /// Stops a process gracefully (SIGTERM) and waits for it.
    pub async fn stop(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(mut p) = self.procs.remove(name) else {
            return Ok(());
        };
        if let Some(pid) = p.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        match tokio::time::timeout(Duration::from_secs(30), p.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!("{name} exited with {status} after SIGTERM");
                }
            }
            Err(_) => {
                p.child.kill().await?;
                bail!("{name} did not stop within 30 s of SIGTERM");
            }
        }
        Ok(())
    }

    /// Kills a process with SIGKILL (a crash).
    pub async fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        if let Some(mut p) = self.procs.remove(name) {
            p.child.kill().await?;
        }
        Ok(())
    }

    /// Returns the HTTP address of a process.
    pub fn http_of(&self, name: &str) -> anyhow::Result<String> {
        Ok(format!(
            "http://{}",
            self.procs
                .get(name)
                .with_context(|| format!("{name} is not running"))?
                .http
        ))
    }

    pub async fn wait_http(&self, url: &str, what: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(r) = self.http.get(url).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{what} was not ready at {url} within {timeout:?}; log: {}",
                    self.log_tail(what)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Returns the last lines of a process's log.
    pub fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join("logs").join(format!("{name}.log")))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Runs the `ohx` operations command and returns its JSON output lines.
    pub async fn ohx(&self, args: &[&str]) -> anyhow::Result<Vec<Value>> {
        let out = Command::new(self.bin_dir.join("ohx"))
            .envs(self.ohx_env())
            .args(args)
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "ohx {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("ohx printed non-JSON: {l}")))
            .collect()
    }

    /// Runs `ohx` and returns the `id` it printed.
    pub async fn ohx_id(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.ohx(args).await?;
        out.last()
            .and_then(|v| v.get("id"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .with_context(|| format!("ohx {args:?} printed no id"))
    }

    /// GETs a FHIR path (relative to the base) as JSON.
    pub async fn fhir(&self, path: &str) -> anyhow::Result<Value> {
        read_fhir(&self.http, &format!("{}/{}", self.fhir_base, path), path).await
    }

    /// Returns every resource of a search (following `next` links).
    pub async fn search(&self, query: &str) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut page = self.fhir(query).await?;
        loop {
            for e in page
                .get("entry")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
            {
                if let Some(r) = e.get("resource") {
                    out.push(r.clone());
                }
            }
            let next = page
                .get("link")
                .and_then(Value::as_array)
                .and_then(|ls| {
                    ls.iter()
                        .find(|l| l.get("relation").and_then(Value::as_str) == Some("next"))
                })
                .and_then(|l| l.get("url"))
                .and_then(Value::as_str)
                .map(str::to_string);
            match next {
                Some(url) => page = read_fhir(&self.http, &url, &url).await?,
                None => break,
            }
        }
        Ok(out)
    }

    /// Returns the value of a metric summed over the series whose labels contain every filter.
    pub async fn metric(&self, process: &str, name: &str, filters: &[&str]) -> anyhow::Result<f64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.http_of(process)?))
            .send()
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .filter(|l| filters.iter().all(|f| l.contains(f)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Drops the test database.
    pub async fn drop_database(&self) -> anyhow::Result<()> {
        let (client, conn) = tokio_postgres::connect(
            "postgres://postgres@127.0.0.1:5432/postgres",
            tokio_postgres::NoTls,
        )
        .await?;
        tokio::spawn(conn);
        let name = self.db_url.rsplit('/').next().unwrap_or_default();
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
        Ok(())
    }

    /// Connects to the test database.
    pub async fn db(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.db_url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }
}

/// A benchmark setting from the environment, else `default`.
pub fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where benchmarks take the binaries: `OHX_BIN_DIR` if set (see [`bin_dir`]), else the release
/// build.
pub fn bench_bin_dir() -> PathBuf {
    if std::env::var_os("OHX_BIN_DIR").is_some() {
        bin_dir()
    } else {
        target_dir().join("release")
    }
}

/// A running test authorization server.
#[derive(Debug, Clone)]
pub struct Authz {
    pub issuer: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
}

/// An access token for `scopes` from `token_endpoint` by the client credentials grant, the
/// client authenticating with its secret (HTTP basic).
pub async fn client_token(
    http: &reqwest::Client,
    token_endpoint: &str,
    (client_id, secret): (&str, &str),
    scopes: &str,
) -> anyhow::Result<String> {
    let answer: serde_json::Value = http
        .post(token_endpoint)
        .basic_auth(client_id, Some(secret))
        .form(&[("grant_type", "client_credentials"), ("scope", scopes)])
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    answer["access_token"]
        .as_str()
        .map(str::to_owned)
        .context("no access_token")
}

/// User + system CPU seconds a process has used (`/proc/{pid}/stat`, 10 ms ticks; `self`: this
/// process); 0 if it cannot be read.
pub fn cpu_seconds_of(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is field 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// For benchmarks: tansu, a fresh database with the topics, and nothing else (hfs and the
/// stages needed are started by the caller), from [`bench_bin_dir`]; `binaries` must be built.
/// Its HTTP client waits up to `http_timeout`.
pub async fn minimal_stack(
    name: &str,
    binaries: &[&str],
    http_timeout: Duration,
) -> anyhow::Result<Stack> {
    let run = format!("{name}_{}", std::process::id());
    let dir = target_dir().join("bench").join(&run);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("logs"))?;
    let bin_dir = bench_bin_dir();
    for b in binaries.iter().chain(&["ohx"]) {
        if !bin_dir.join(b).is_file() {
            anyhow::bail!(
                "{} is missing: run `cargo build --release --workspace --bins` first (or set OHX_BIN_DIR)",
                bin_dir.join(b).display()
            );
        }
    }
    let (child, kafka) = spawn_tansu(&dir, "tansu").await?;
    let stack = Stack {
        dir,
        bin_dir,
        kafka: kafka.clone(),
        fhir_base: String::new(),
        db_url: format!("postgres://postgres@127.0.0.1:5432/ohx_bench_{run}"),
        sim_url: String::new(),
        omron_url: String::new(),
        google_url: String::new(),
        procs: HashMap::from([("tansu".to_owned(), Proc { child, http: kafka })]),
        stage_env: HashMap::new(),
        extra_env: Vec::new(),
        http: reqwest::Client::builder().timeout(http_timeout).build()?,
        ports: HashMap::new(),
        tansu_db: "tansu".into(),
    };
    stack.ohx(&["migrate"]).await?;
    stack.ohx(&["topics", "apply"]).await?;
    Ok(stack)
}
