//! The shared runtime (`ohx_common::kafka::run_stage`) against the real broker (tansu):
//! rebalances with members joining and leaving mid-stream lose nothing, a shutdown during a
//! retry commits nothing, a retried batch sees the state it saw the first time, commits never
//! pass the processor's commit point, undecodable records are dead-lettered, and a service
//! whose port is taken exits with the reason.

use ohx_common::admin::Health;
use ohx_common::codec::Codec;
use ohx_common::kafka::{
    Emitter, Input, KafkaSettings, Processor, Producer, StageError, StageSettings, run_stage,
};
use ohx_common::records::{Context, SyncRequest, topic};
use ohx_tests::kafka_util::{group_lag, produce_raw, read_all};
use ohx_tests::stack::spawn_tansu;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const IN: &str = "rt.in";
const OUT: &str = "rt.out";
const PARTITIONS: i32 = 4;

struct Broker {
    _dir: tempdir::Dir,
    _child: tokio::process::Child,
    addr: String,
}

mod tempdir {
    /// A directory removed when dropped.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn broker(name: &str) -> anyhow::Result<Broker> {
    let dir = std::env::temp_dir().join(format!("ohx-rt-{name}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let (child, addr) = spawn_tansu(&dir, "tansu").await?;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &addr)
        .set("broker.address.family", "v4")
        .create()?;
    let topics = [
        NewTopic::new(IN, PARTITIONS, TopicReplication::Fixed(1)),
        NewTopic::new(OUT, PARTITIONS, TopicReplication::Fixed(1)),
        NewTopic::new(topic::DEAD_LETTER, 1, TopicReplication::Fixed(1)),
    ];
    for r in admin.create_topics(&topics, &AdminOptions::new()).await? {
        if let Err((t, e)) = r {
            anyhow::bail!("cannot create {t}: {e}");
        }
    }
    Ok(Broker {
        _dir: tempdir::Dir(dir),
        _child: child,
        addr,
    })
}

fn kafka(addr: &str) -> KafkaSettings {
    KafkaSettings {
        bootstrap: addr.to_string(),
        extra: vec![],
    }
}

fn producer(addr: &str) -> anyhow::Result<Producer> {
    Ok(Producer::new(
        &kafka(addr),
        Arc::new(Codec::embedded()?),
        Duration::from_secs(30),
        Health::with_grace(Duration::from_secs(60)),
    )?)
}

fn request(n: usize) -> SyncRequest {
    SyncRequest {
        context: Context {
            organization_id: "o".into(),
            ehr_target_id: "t".into(),
            patient_id: "p".into(),
            patient_reference: "Patient/1".into(),
            provider: "withings".into(),
            link_id: format!("link-{n}"),
            provider_user_id: "1".into(),
            sync_request_id: format!("input-{n}"),
            trigger: "MANUAL".into(),
            received_at: 0,
        },
        categories: vec![],
        window_start: None,
        window_end: None,
        provider_event: None,
    }
}

/// Produces `count` inputs, keyed so they spread over the partitions.
async fn produce_inputs(p: &Producer, from: usize, count: usize) -> anyhow::Result<()> {
    for n in from..from + count {
        p.send_record(IN, &format!("key-{n}"), &request(n)).await?;
    }
    Ok(())
}

fn settings(group: &str) -> StageSettings {
    StageSettings {
        stage: "runtime-test",
        group_id: group.to_string(),
        input_topics: vec![IN],
        max_batch: 50,
        linger: Duration::from_millis(5),
        tick: None,
        registry_give_up: Duration::from_secs(300),
        rejoin_after: Duration::from_secs(20),
    }
}

/// Copies every input to `rt.out`, naming the input in `provider_event`; optionally slow,
/// failing transiently a number of times, and limiting commits.
#[derive(Clone, Default)]
struct Copier {
    delay: Duration,
    fail_first: Arc<Mutex<usize>>,
    /// The state this processor changes only in `apply`: batches applied.
    applied: usize,
    /// What each `process` call saw: (state, first input's sync_request_id).
    seen: Arc<Mutex<Vec<(usize, String)>>>,
    commit_limit: Option<i64>,
}

impl Processor for Copier {
    type In = SyncRequest;
    type Change = usize;

    async fn process(
        &mut self,
        batch: &[Input<SyncRequest>],
        out: &mut Emitter,
    ) -> Result<usize, StageError> {
        if let (Ok(mut seen), Some(first)) = (self.seen.lock(), batch.first()) {
            seen.push((self.applied, first.value.context.sync_request_id.clone()));
        }
        tokio::time::sleep(self.delay).await;
        let fail = match self.fail_first.lock() {
            Ok(mut left) if *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        };
        if fail {
            return Err(StageError::transient("test", "asked to fail"));
        }
        for input in batch {
            let mut r = input.value.clone();
            r.provider_event = Some(input.value.context.sync_request_id.clone());
            out.emit(OUT, &format!("{}", input.offset), &r).await?;
        }
        Ok(batch.len())
    }

    async fn apply(&mut self, _change: &usize) -> Result<(), StageError> {
        self.applied += 1;
        Ok(())
    }

    fn commit_point(&self, _t: &str, _p: i32, next: i64) -> (i64, Option<String>) {
        match self.commit_limit {
            Some(limit) => (next.min(limit), None),
            None => (next, None),
        }
    }
}

struct Member {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn start_member(addr: &str, group: &str, processor: Copier) -> anyhow::Result<Member> {
    let stop = CancellationToken::new();
    let p = producer(addr)?;
    let (k, s, t) = (kafka(addr), settings(group), stop.clone());
    let task = tokio::spawn(async move {
        run_stage(
            s,
            &k,
            p,
            processor,
            Health::with_grace(Duration::from_secs(60)),
            t,
        )
        .await
    });
    Ok(Member { stop, task })
}

/// The input ids copied to `rt.out` so far.
async fn copied(addr: &str) -> anyhow::Result<BTreeSet<String>> {
    let codec = Codec::embedded()?;
    let mut ids = BTreeSet::new();
    let addr = addr.to_string();
    let raw = tokio::task::spawn_blocking(move || read_all(&addr, OUT)).await??;
    for r in raw {
        let value: SyncRequest = codec.decode(&r.1).await?;
        if let Some(id) = value.provider_event {
            ids.insert(id);
        }
    }
    Ok(ids)
}

async fn lag(addr: &str, group: &str) -> anyhow::Result<i64> {
    let (a, g) = (addr.to_string(), group.to_string());
    tokio::task::spawn_blocking(move || group_lag(&a, &g, IN)).await?
}

async fn wait_for(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn expected(count: usize) -> BTreeSet<String> {
    (0..count).map(|n| format!("input-{n}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_members_joining_and_leaving_mid_stream_lose_nothing() -> anyhow::Result<()> {
    let b = broker("rebalance").await?;
    let group = "rt.rebalance";
    let p = producer(&b.addr)?;
    const TOTAL: usize = 6000;
    produce_inputs(&p, 0, 1000).await?;
    let slow = Copier {
        delay: Duration::from_millis(15),
        ..Copier::default()
    };
    let a = start_member(&b.addr, group, slow.clone())?;
    // Rebalances land while records stream in and every member is mid-batch.
    let feeder = {
        let p = p.clone();
        tokio::spawn(async move { produce_inputs(&p, 1000, TOTAL - 1000).await })
    };
    // Three rounds of two members joining, then leaving: one gracefully, one dropped
    // mid-batch without its graceful path.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let m2 = start_member(&b.addr, group, slow.clone())?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let m3 = start_member(&b.addr, group, slow.clone())?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        m2.stop.cancel();
        m2.task.await??;
        tokio::time::sleep(Duration::from_secs(2)).await;
        m3.task.abort();
        let _ = m3.task.await;
    }
    feeder.await??;
    wait_for(
        "the group to commit everything",
        Duration::from_secs(120),
        async || Ok(lag(&b.addr, group).await? == 0),
    )
    .await?;
    let got = copied(&b.addr).await?;
    let want = expected(TOTAL);
    let missing: Vec<&String> = want.difference(&got).collect();
    a.stop.cancel();
    a.task.await??;
    assert!(
        missing.is_empty(),
        "{} inputs committed but never copied, e.g. {:?}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_shutdown_during_a_retry_commits_nothing_and_the_next_member_gets_everything()
-> anyhow::Result<()> {
    let b = broker("shutdown").await?;
    let group = "rt.shutdown";
    let p = producer(&b.addr)?;
    produce_inputs(&p, 0, 20).await?;
    let failing = Copier {
        fail_first: Arc::new(Mutex::new(usize::MAX)),
        ..Copier::default()
    };
    let seen = failing.seen.clone();
    let m = start_member(&b.addr, group, failing)?;
    wait_for("two failed attempts", Duration::from_secs(60), async || {
        Ok(seen.lock().map(|s| s.len()).unwrap_or(0) >= 2)
    })
    .await?;
    m.stop.cancel();
    m.task.await??;
    assert_eq!(lag(&b.addr, group).await?, 20, "nothing may be committed");
    assert!(copied(&b.addr).await?.is_empty());

    let m = start_member(&b.addr, group, Copier::default())?;
    wait_for(
        "the group to commit everything",
        Duration::from_secs(60),
        async || Ok(lag(&b.addr, group).await? == 0),
    )
    .await?;
    m.stop.cancel();
    m.task.await??;
    assert_eq!(copied(&b.addr).await?, expected(20));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_retried_batch_sees_the_state_of_its_first_attempt() -> anyhow::Result<()> {
    let b = broker("retry").await?;
    let group = "rt.retry";
    let p = producer(&b.addr)?;
    produce_inputs(&p, 0, 1).await?;
    let copier = Copier {
        fail_first: Arc::new(Mutex::new(2)),
        ..Copier::default()
    };
    let seen = copier.seen.clone();
    let m = start_member(&b.addr, group, copier)?;
    wait_for("the group to commit", Duration::from_secs(60), async || {
        Ok(lag(&b.addr, group).await? == 0)
    })
    .await?;
    produce_inputs(&p, 1, 1).await?;
    wait_for(
        "the group to commit again",
        Duration::from_secs(60),
        async || Ok(lag(&b.addr, group).await? == 0),
    )
    .await?;
    m.stop.cancel();
    m.task.await??;
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(
        seen,
        vec![
            (0, "input-0".to_string()),
            (0, "input-0".to_string()),
            (0, "input-0".to_string()),
            (1, "input-1".to_string()),
        ],
        "two failed attempts and the success see state 0; the next batch sees it applied once"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_commits_never_pass_the_processors_commit_point() -> anyhow::Result<()> {
    let b = broker("commitpoint").await?;
    let group = "rt.commitpoint";
    let p = producer(&b.addr)?;
    // All on one key: one partition, offsets 0..10.
    for n in 0..10 {
        p.send_record(IN, "one-key", &request(n)).await?;
    }
    let m = start_member(
        &b.addr,
        group,
        Copier {
            commit_limit: Some(4),
            ..Copier::default()
        },
    )?;
    wait_for("all ten copied", Duration::from_secs(60), async || {
        Ok(copied(&b.addr).await?.len() == 10)
    })
    .await?;
    wait_for(
        "the commit at the commit point",
        Duration::from_secs(30),
        async || Ok(lag(&b.addr, group).await? == 6),
    )
    .await?;
    m.stop.cancel();
    m.task.await??;
    assert_eq!(
        lag(&b.addr, group).await?,
        6,
        "the final commit keeps the commit point too"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_an_undecodable_record_is_dead_lettered_and_the_rest_processed() -> anyhow::Result<()>
{
    let b = broker("decode").await?;
    let group = "rt.decode";
    let p = producer(&b.addr)?;
    produce_inputs(&p, 0, 3).await?;
    produce_raw(&b.addr, IN, "key-0", b"\x00\x00\x00\x00\x01not avro").await?;
    produce_inputs(&p, 3, 3).await?;
    let m = start_member(&b.addr, group, Copier::default())?;
    wait_for(
        "the group to commit everything",
        Duration::from_secs(60),
        async || Ok(lag(&b.addr, group).await? == 0),
    )
    .await?;
    m.stop.cancel();
    m.task.await??;
    assert_eq!(copied(&b.addr).await?, expected(6));
    let addr = b.addr.clone();
    let dead = tokio::task::spawn_blocking(move || read_all(&addr, topic::DEAD_LETTER)).await??;
    assert_eq!(dead.len(), 1, "exactly the garbage record is dead-lettered");
    let codec = Codec::embedded()?;
    let dl: ohx_common::records::DeadLetter = codec.decode(&dead[0].1).await?;
    assert_eq!(dl.topic, IN);
    assert_eq!(dl.error_kind, "decode");
    assert_eq!(
        dl.payload.as_deref(),
        Some(&b"\x00\x00\x00\x00\x01not avro"[..])
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_service_whose_port_is_taken_exits_with_the_reason() -> anyhow::Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = std::env::var_os("OHX_BIN_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| target.join("debug"))
        .join("deduplicator");
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(&bin)
            .env("OHX_HTTP_ADDR", &addr)
            .env("OHX_KAFKA_BOOTSTRAP", "127.0.0.1:1")
            .env("OHX_STARTUP_TIMEOUT_MS", "20000")
            .output(),
    )
    .await??;
    assert!(!output.status.success(), "it must exit with an error");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stderr.contains("cannot listen on") || stdout.contains("cannot listen on"),
        "the reason names the port: {stderr} {stdout}"
    );
    drop(taken);
    Ok(())
}
