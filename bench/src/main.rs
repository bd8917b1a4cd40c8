//! `keyhole-bench`: every figure of the benchmark table, measured in one run on one machine, so
//! ratios compare like with like. Prints a markdown table.
//!
//! Full run:  `scripts/bench` (a release build, then this binary)
//! Smoke run: `keyhole-bench --smoke` (a few iterations of everything, so nothing rots; CI)
//!
//! The binary re-executes itself for its helper processes: the raw echo server (the socket
//! floor), the gRPC server, and the spawn-per-call credential helper.

#![forbid(unsafe_code)]

mod file_store;
mod grpc;
mod stats;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use keyhole_gateway::api::{ApiOp, ApiReply};
use keyhole_gateway::client::GatewayClient;
use keyhole_protocol::{Encoding, Op, Outcome, Reply, SecretBytes};
use keyhole_provider_memory::{MemoryOptions, MemoryProvider};
use keyhole_providers::Provider;
use keyhole_transport::awake::STAY_AWAKE_ENV;
use keyhole_transport::client::Client;
use keyhole_transport::spawn::{SpawnOptions, Spawned, spawn};
use stats::Samples;

/// keyhole's benchmark harness.
#[derive(Parser)]
struct Cli {
    /// A few iterations of everything: checks the harness works, measures nothing reliable.
    #[arg(long)]
    smoke: bool,
    /// Also write the table to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run only the end-to-end gateway measurement (for profiling the gateway).
    #[arg(long)]
    only_e2e: bool,
    /// Run only the interleaved floor comparison (for profiling the round trip).
    #[arg(long, conflicts_with = "only_e2e")]
    only_floor: bool,
    /// Run only provider-file's resolve at 100 and at 100,000 records (interleaved, in process).
    #[arg(long, conflicts_with_all = ["only_e2e", "only_floor"])]
    only_file_store: bool,
    /// With `--only-floor`: measure under this placement alone, for profiling one of them.
    #[arg(long, requires = "only_floor", value_enum)]
    placement: Option<Placement>,
    /// Internal: run the raw echo server on this socket.
    #[arg(long, hide = true)]
    echo_server: Option<PathBuf>,
    /// Internal: run the raw echo server on this socket, on a single-threaded tokio runtime.
    #[arg(long, hide = true)]
    tokio_echo_server: Option<PathBuf>,
    /// Internal: run the gRPC server on this socket.
    #[arg(long, hide = true)]
    grpc_server: Option<PathBuf>,
    /// Internal: act as a spawn-per-call credential helper.
    #[arg(long, hide = true)]
    credential_helper: bool,
    /// Internal: payload size for the helper modes.
    #[arg(long, hide = true, default_value_t = 64)]
    size: usize,
}

/// How much of each measurement to do.
#[derive(Clone, Copy)]
struct Effort {
    warmup: usize,
    latency: usize,
    throughput: usize,
    spawns: usize,
    e2e: usize,
}

const FULL: Effort = Effort {
    warmup: 2_000,
    latency: 20_000,
    throughput: 200_000,
    spawns: 200,
    e2e: 20_000,
};
const SMOKE: Effort = Effort {
    warmup: 10,
    latency: 50,
    throughput: 640,
    spawns: 3,
    e2e: 128,
};

fn main() {
    let cli = Cli::parse();
    let result = if let Some(path) = &cli.echo_server {
        echo_server(path, cli.size)
    } else if let Some(path) = &cli.tokio_echo_server {
        tokio_echo_server(path, cli.size)
    } else if let Some(path) = &cli.grpc_server {
        grpc::serve(path, cli.size).map_err(|e| e.to_string())
    } else if cli.credential_helper {
        credential_helper(cli.size)
    } else {
        let effort = if cli.smoke { SMOKE } else { FULL };
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                if cli.only_e2e {
                    rt.block_on(e2e_only(effort))
                } else if cli.only_floor {
                    rt.block_on(floor_only(effort, cli.placement))
                } else if cli.only_file_store {
                    rt.block_on(file_store_rows(cli.smoke, &std::env::temp_dir()))
                        .map(|rows| table(rows, cli.smoke))
                } else {
                    rt.block_on(run(effort, cli.smoke))
                }
            })
            .and_then(|table| {
                print!("{table}");
                match &cli.out {
                    Some(path) => std::fs::write(path, &table).map_err(|e| e.to_string()),
                    None => Ok(()),
                }
            })
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// A binary beside this one (the workspace's build output).
fn sibling(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let path = exe
        .parent()
        .map(|d| d.join(name))
        .ok_or("no parent directory")?;
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing: build the workspace's binaries first (cargo build --release --workspace --bins)",
            path.display()
        ))
    }
}

fn value(size: usize) -> SecretBytes {
    SecretBytes::new((0..size).map(|i| (i % 251) as u8).collect())
}

// --- helper processes -------------------------------------------------------------------------

/// The floor: echo fixed-size messages back, with blocking I/O and nothing else.
fn echo_server(path: &Path, size: usize) -> Result<(), String> {
    let listener = UnixListener::bind(path).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; size];
    loop {
        // One connection at a time: the readiness probe's, then the measurement's.
        let (mut conn, _) = listener.accept().map_err(|e| e.to_string())?;
        while conn.read_exact(&mut buf).is_ok() {
            if conn.write_all(&buf).is_err() {
                break;
            }
        }
    }
}

/// The same echo, on the runtime keyhole's providers use (tokio, one thread, epoll): the part of
/// keyhole's round trip that is the event loop's and not the protocol's.
fn tokio_echo_server(path: &Path, size: usize) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let listener = tokio::net::UnixListener::bind(path).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; size];
        loop {
            let (mut conn, _) = listener.accept().await.map_err(|e| e.to_string())?;
            while conn.read_exact(&mut buf).await.is_ok() {
                if conn.write_all(&buf).await.is_err() {
                    break;
                }
            }
        }
    })
}

/// docker-credential-helpers style: read the request on stdin, write the value to stdout, exit.
fn credential_helper(size: usize) -> Result<(), String> {
    let mut request = String::new();
    std::io::stdin()
        .read_line(&mut request)
        .map_err(|e| e.to_string())?;
    std::io::stdout()
        .write_all(value(size).expose())
        .map_err(|e| e.to_string())
}

fn self_exe() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| e.to_string())
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `path` exists (a token file the gateway writes once it listens).
fn wait_for(path: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} never appeared", path.display()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Waits until an echo helper listens on `path`: the file appears at bind(), a moment before
/// listen(), so this waits for a connection to succeed (and closes it).
fn wait_listening(path: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(path) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(format!("{} never accepted: {e}", path.display()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

// --- measurements -----------------------------------------------------------------------------

async fn in_process(effort: Effort) -> Result<Samples, String> {
    let p = MemoryProvider::new(MemoryOptions::default());
    p.store(keyhole_providers::StoreRequest {
        name: "bench".into(),
        value: value(64),
        create_only: false,
        labels: BTreeMap::new(),
    })
    .await
    .map_err(|e| e.to_string())?;
    let mut s = Samples::default();
    for i in 0..effort.warmup + effort.latency {
        let t = Instant::now();
        let r = p.resolve("bench", None).await.map_err(|e| e.to_string())?;
        std::hint::black_box(r);
        if i >= effort.warmup {
            s.push(t.elapsed());
        }
    }
    Ok(s)
}

fn raw_socket(effort: Effort, size: usize, dir: &Path) -> Result<Samples, String> {
    let path = dir.join(format!("echo-{size}"));
    let _server = Child(
        Command::new(self_exe()?)
            .arg("--echo-server")
            .arg(&path)
            .arg("--size")
            .arg(size.to_string())
            .spawn()
            .map_err(|e| e.to_string())?,
    );
    wait_listening(&path)?;
    let mut conn = UnixStream::connect(&path).map_err(|e| e.to_string())?;
    let out = vec![7u8; size];
    let mut back = vec![0u8; size];
    let mut s = Samples::default();
    for i in 0..effort.warmup + effort.latency {
        let t = Instant::now();
        conn.write_all(&out).map_err(|e| e.to_string())?;
        conn.read_exact(&mut back).map_err(|e| e.to_string())?;
        if i >= effort.warmup {
            s.push(t.elapsed());
        }
    }
    Ok(s)
}

/// The floor and keyhole's round trip, measured in alternating blocks so both see the same
/// scheduler conditions: on these VMs the cost of a cross-core wake-up swings between runs, and a
/// ratio of two measurements taken minutes apart says more about placement than about code.
/// A third series, a 64-byte ping-pong with tokio at both ends, separates the event loop's share
/// of keyhole's round trip (epoll wake-ups instead of a blocked read's) from the protocol's; a
/// fourth, tonic gRPC over UDS, is the comparison the 2.5x goal names.
///
/// `placement` pins the processes, because on these VMs where the scheduler happens to put them
/// decides the result: a wake-up on the same core costs a few µs, one across cores a VM exit.
async fn paired_floor(
    effort: Effort,
    dir: &Path,
    memory: &Path,
    placement: Placement,
) -> Result<Floors, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Sockets of their own: a run per placement must not meet the last one's socket files.
    let own = tempfile::tempdir_in(dir).map_err(|e| e.to_string())?;
    let dir = own.path();
    let tokio_path = dir.join("echo-tokio");
    let _tokio_server = Child(
        Command::new(self_exe()?)
            .arg("--tokio-echo-server")
            .arg(&tokio_path)
            .spawn()
            .map_err(|e| e.to_string())?,
    );
    wait_listening(&tokio_path)?;
    let mut tokio_conn = tokio::net::UnixStream::connect(&tokio_path)
        .await
        .map_err(|e| e.to_string())?;
    let mut event_loop = Samples::default();
    let grpc_path = dir.join("grpc.sock");
    let _grpc_server = Child(
        Command::new(self_exe()?)
            .arg("--grpc-server")
            .arg(&grpc_path)
            .arg("--size")
            .arg("64")
            .spawn()
            .map_err(|e| e.to_string())?,
    );
    wait_listening(&grpc_path)?;
    let mut grpc_client = grpc::connect(&grpc_path).await.map_err(|e| e.to_string())?;
    let mut grpc = Samples::default();
    let path = dir.join("echo-paired");
    let _server = Child(
        Command::new(self_exe()?)
            .arg("--echo-server")
            .arg(&path)
            .arg("--size")
            .arg("64")
            .spawn()
            .map_err(|e| e.to_string())?,
    );
    wait_listening(&path)?;
    let mut conn = UnixStream::connect(&path).map_err(|e| e.to_string())?;
    let running = start_provider(memory, &[], Encoding::Bincode).await?;
    store(&running.client, 64).await?;
    let running_json = start_provider(memory, &[], Encoding::Json).await?;
    store(&running_json.client, 64).await?;
    let servers = [
        Some(_tokio_server.0.id()),
        Some(_grpc_server.0.id()),
        Some(_server.0.id()),
        running.process.pid(),
        running_json.process.pid(),
    ];
    let _unpin = placement.apply(servers.into_iter().flatten())?;
    let (mut raw, mut kh, mut json) = (Samples::default(), Samples::default(), Samples::default());
    let rounds = 20;
    let block = (effort.latency / rounds).max(1);
    let (out, mut back) = (vec![7u8; 64], vec![0u8; 64]);
    for round in 0..rounds + 1 {
        let keep = round > 0; // the first round is warm-up
        for _ in 0..block {
            let t = Instant::now();
            conn.write_all(&out).map_err(|e| e.to_string())?;
            conn.read_exact(&mut back).map_err(|e| e.to_string())?;
            if keep {
                raw.push(t.elapsed());
            }
        }
        resolve_block(&running.client, block, keep.then_some(&mut kh)).await?;
        resolve_block(&running_json.client, block, keep.then_some(&mut json)).await?;
        for _ in 0..block {
            let t = Instant::now();
            tokio_conn
                .write_all(&out)
                .await
                .map_err(|e| e.to_string())?;
            tokio_conn
                .read_exact(&mut back)
                .await
                .map_err(|e| e.to_string())?;
            if keep {
                event_loop.push(t.elapsed());
            }
        }
        for _ in 0..block {
            let t = Instant::now();
            let answer = grpc::resolve(&mut grpc_client)
                .await
                .map_err(|e| e.to_string())?;
            std::hint::black_box(answer);
            if keep {
                grpc.push(t.elapsed());
            }
        }
    }
    for r in [&running, &running_json] {
        let _ = r.client.call(Op::Goodbye {}, Duration::from_secs(2)).await;
    }
    Ok(Floors {
        raw,
        event_loop,
        keyhole: kh,
        json,
        grpc,
    })
}

/// `block` resolves of the 64-byte value, one at a time, timed into `into` if given.
async fn resolve_block(
    client: &Client,
    block: usize,
    mut into: Option<&mut Samples>,
) -> Result<(), String> {
    for _ in 0..block {
        let t = Instant::now();
        match client.call(resolve_op(), Duration::from_secs(10)).await {
            Ok(Outcome::Ok(Reply::Resolved { .. })) => {}
            other => return Err(format!("resolve failed: {other:?}")),
        }
        if let Some(samples) = into.as_deref_mut() {
            samples.push(t.elapsed());
        }
    }
    Ok(())
}

/// Where [`paired_floor`] runs its processes.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Placement {
    /// Wherever the scheduler puts them.
    Scheduler,
    /// The bench on CPU 0, every server and the provider on CPU 0 too.
    #[value(name = "one-core")]
    SameCore,
    /// The bench on CPU 0, every server and the provider on CPU 1.
    #[value(name = "two-cores")]
    CrossCore,
}

impl Placement {
    fn label(self) -> &'static str {
        match self {
            Placement::Scheduler => "placed by the scheduler",
            Placement::SameCore => "all on one core",
            Placement::CrossCore => "client and servers on different cores",
        }
    }

    /// Pins this thread and `servers`; the guard lets this thread run anywhere again.
    fn apply(self, servers: impl Iterator<Item = u32>) -> Result<AffinityGuard, String> {
        use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
        use nix::unistd::Pid;
        let me = Pid::from_raw(0);
        let before = sched_getaffinity(me).map_err(|e| format!("sched_getaffinity: {e}"))?;
        let server_cpu = match self {
            Placement::Scheduler => return Ok(AffinityGuard(before)),
            Placement::SameCore => 0,
            Placement::CrossCore => 1,
        };
        let on = |cpu: usize| -> Result<CpuSet, String> {
            let mut set = CpuSet::new();
            set.set(cpu).map_err(|e| format!("cpu {cpu}: {e}"))?;
            Ok(set)
        };
        sched_setaffinity(me, &on(0)?).map_err(|e| format!("pinning the bench: {e}"))?;
        for pid in servers {
            let pid = Pid::from_raw(i32::try_from(pid).map_err(|e| e.to_string())?);
            sched_setaffinity(pid, &on(server_cpu)?)
                .map_err(|e| format!("pinning {pid} to cpu {server_cpu}: {e}"))?;
        }
        Ok(AffinityGuard(before))
    }
}

/// Restores this thread's CPU affinity when dropped.
struct AffinityGuard(nix::sched::CpuSet);

impl Drop for AffinityGuard {
    fn drop(&mut self) {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &self.0);
    }
}

/// The interleaved series of [`paired_floor`].
struct Floors {
    raw: Samples,
    event_loop: Samples,
    keyhole: Samples,
    /// The same resolve from a second provider that speaks JSON.
    json: Samples,
    /// A tonic unary call over UDS, the same 64-byte value.
    grpc: Samples,
}

/// A provider started the gateway's way, with one connection.
struct Running {
    client: Arc<Client>,
    process: Spawned,
}

async fn start_provider(
    program: &Path,
    args: &[OsString],
    encoding: Encoding,
) -> Result<Running, String> {
    start(&SpawnOptions::new(program, args.to_vec(), encoding)).await
}

async fn start(options: &SpawnOptions) -> Result<Running, String> {
    let (process, conn) = spawn(options).await.map_err(|e| e.to_string())?;
    let (tx, _rx) = keyhole_transport::client::event_channel();
    Ok(Running {
        client: Arc::new(Client::start(conn.reader, conn.writer, conn.ack, tx)),
        process,
    })
}

async fn store(client: &Client, size: usize) -> Result<(), String> {
    let op = Op::Store {
        name: "bench".into(),
        value: value(size),
        create_only: false,
        labels: BTreeMap::new(),
    };
    match client.call(op, Duration::from_secs(10)).await {
        Ok(Outcome::Ok(Reply::Stored { .. })) => Ok(()),
        other => Err(format!("store failed: {other:?}")),
    }
}

fn resolve_op() -> Op {
    Op::Resolve {
        name: "bench".into(),
        version: None,
    }
}

async fn round_trip(client: &Client, effort: Effort) -> Result<Samples, String> {
    let mut s = Samples::default();
    for i in 0..effort.warmup + effort.latency {
        let t = Instant::now();
        match client.call(resolve_op(), Duration::from_secs(10)).await {
            Ok(Outcome::Ok(Reply::Resolved { .. })) => {}
            other => return Err(format!("resolve failed: {other:?}")),
        }
        if i >= effort.warmup {
            s.push(t.elapsed());
        }
    }
    Ok(s)
}

/// Resolves per second with `in_flight` requests outstanding on one connection.
async fn throughput(client: &Arc<Client>, in_flight: usize, total: usize) -> Result<f64, String> {
    let per_task = total / in_flight;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let client = Arc::clone(client);
        tasks.spawn(async move {
            for _ in 0..per_task {
                match client.call(resolve_op(), Duration::from_secs(30)).await {
                    Ok(Outcome::Ok(Reply::Resolved { .. })) => {}
                    other => return Err(format!("resolve failed: {other:?}")),
                }
            }
            Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    Ok((per_task * in_flight) as f64 / started.elapsed().as_secs_f64())
}

fn spawn_per_call(effort: Effort) -> Result<Samples, String> {
    let exe = self_exe()?;
    let mut s = Samples::default();
    for i in 0..effort.spawns + 3 {
        let t = Instant::now();
        let mut child = Command::new(&exe)
            .arg("--credential-helper")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(b"bench\n").map_err(|e| e.to_string())?;
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.stdout.len() != 64 {
            return Err("the credential helper answered the wrong length".into());
        }
        if i >= 3 {
            s.push(t.elapsed());
        }
    }
    Ok(s)
}

async fn spawn_handshake(program: &Path, effort: Effort) -> Result<Samples, String> {
    let mut s = Samples::default();
    for i in 0..effort.spawns + 3 {
        let t = Instant::now();
        let mut running = start_provider(program, &[], Encoding::Bincode).await?;
        if i >= 3 {
            s.push(t.elapsed());
        }
        let _ = running
            .client
            .call(Op::Goodbye {}, Duration::from_secs(2))
            .await;
        running.process.wait_exit(Duration::from_secs(2)).await;
    }
    Ok(s)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
}

/// The machine's CPU time so far, from `/proc/stat`: (stolen by the hypervisor, total), in ticks.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal: guest time is counted in user already.
    let steal = *fields.get(7)?;
    Some((steal, fields.iter().take(8).sum()))
}

/// The share of the machine's CPU time the hypervisor gave to others since `before` (from
/// [`cpu_ticks`]): on a shared VM, what slowed every wake-up in a run down.
fn steal_since(before: Option<(u64, u64)>) -> Option<f64> {
    let ((s0, t0), (s1, t1)) = (before?, cpu_ticks()?);
    // Counters can step back (some hypervisors; a CPU going offline leaves the sum): unknown.
    let stolen = s1.checked_sub(s0)?;
    let total = t1.checked_sub(t0).filter(|&t| t > 0)?;
    Some(stolen as f64 / total as f64)
}

fn fmt_steal(steal: Option<f64>) -> String {
    steal.map_or_else(
        || "host steal unknown".to_string(),
        |s| format!("host steal {:.0}%", s * 100.0),
    )
}

/// Nanoseconds a task has spent on a CPU (`/proc/.../schedstat`, first field): `pid`'s main
/// thread, or this thread when `None`.
fn cpu_ns(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/schedstat"),
        None => "/proc/thread-self/schedstat".to_string(),
    };
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What staying awake costs: CPU time per resolve, in the provider (its one runtime thread) and
/// in this client thread, for calls back to back and for calls paced `gap` apart (where most
/// waits end in sleep and the back-off decides how much polling is wasted).
struct AwakeCost {
    provider_ns: f64,
    client_ns: f64,
}

async fn awake_cost(
    memory: &Path,
    calls: usize,
    gap: Option<Duration>,
    stay_awake: bool,
) -> Result<AwakeCost, String> {
    let mut options = SpawnOptions::new(memory, Vec::<OsString>::new(), Encoding::Bincode);
    if !stay_awake {
        options
            .env
            .push((OsString::from(STAY_AWAKE_ENV), OsString::from("off")));
    }
    let running = start(&options).await?;
    store(&running.client, 64).await?;
    let pid = running.process.pid();
    resolve_block(&running.client, 100, None).await?; // warm-up
    let (p0, c0) = (cpu_ns(pid), cpu_ns(None));
    for _ in 0..calls {
        resolve_block(&running.client, 1, None).await?;
        if let Some(gap) = gap {
            tokio::time::sleep(gap).await;
        }
    }
    let (p1, c1) = (cpu_ns(pid), cpu_ns(None));
    let _ = running
        .client
        .call(Op::Goodbye {}, Duration::from_secs(2))
        .await;
    let per = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / calls.max(1) as f64,
        _ => f64::NAN,
    };
    Ok(AwakeCost {
        provider_ns: per(p0, p1),
        client_ns: per(c0, c1),
    })
}

/// CPU per resolve back to back and paced one call per ms, described for the table.
async fn awake_costs(memory: &Path, effort: Effort) -> Result<String, String> {
    let calls = (effort.latency / 10).max(10);
    let gap = Some(Duration::from_millis(1));
    let busy = awake_cost(memory, calls, None, true).await?;
    let busy_off = awake_cost(memory, calls, None, false).await?;
    let paced = awake_cost(memory, calls / 4, gap, true).await?;
    let paced_off = awake_cost(memory, calls / 4, gap, false).await?;
    Ok(format!(
        "provider, back to back: {} · with {STAY_AWAKE_ENV}=off {}; provider, one call per ms: \
         {} · off {}; client (staying awake): back to back {} · one call per ms {}",
        stats::fmt(busy.provider_ns),
        stats::fmt(busy_off.provider_ns),
        stats::fmt(paced.provider_ns),
        stats::fmt(paced_off.provider_ns),
        stats::fmt(busy.client_ns),
        stats::fmt(paced.client_ns),
    ))
}

/// The gateway end to end: `keyhole serve` on its defaults (the file provider, SQLite, durable
/// audit with group commit), clients resolving through its socket.
struct E2e {
    one: Samples,
    /// A 4 KiB write and fsync on the same disk, interleaved with `one`.
    disk: Samples,
    one_rate: f64,
    /// The hypervisor's share of the machine during the 1-client run, where known.
    one_steal: Option<f64>,
    many_steal: Option<f64>,
    many_rate: f64,
    many: Samples,
    rss_idle_kib: u64,
    rss_load_kib: u64,
}

/// The least a durable record costs on a disk: a 4 KiB write over existing blocks and `fsync`,
/// what one audit commit of one record does (SQLite's WAL frame and its sync).
struct DiskFloor {
    file: std::fs::File,
    page: Vec<u8>,
    slot: u64,
}

impl DiskFloor {
    const SLOTS: u64 = 64;

    fn new(dir: &Path) -> Result<DiskFloor, String> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("disk-floor"))
            .map_err(|e| format!("cannot create the disk floor's file: {e}"))?;
        file.set_len(4096 * Self::SLOTS)
            .and_then(|()| file.sync_all())
            .map_err(|e| format!("cannot size the disk floor's file: {e}"))?;
        Ok(DiskFloor {
            file,
            page: vec![0x5a; 4096],
            slot: 0,
        })
    }

    /// One write and sync, timed.
    fn write(&mut self) -> Result<Duration, String> {
        use std::os::unix::fs::FileExt;
        let t = Instant::now();
        self.file
            .write_all_at(&self.page, self.slot * 4096)
            .and_then(|()| self.file.sync_all())
            .map_err(|e| format!("the disk floor's write failed: {e}"))?;
        self.slot = (self.slot + 1) % Self::SLOTS;
        Ok(t.elapsed())
    }
}

async fn end_to_end(effort: Effort, home: &Path) -> Result<E2e, String> {
    let keyhole = sibling("keyhole")?;
    let env = [
        ("HOME", home.to_path_buf()),
        ("XDG_CONFIG_HOME", home.join("config")),
        ("XDG_DATA_HOME", home.join("data")),
        ("XDG_RUNTIME_DIR", home.join("run")),
    ];
    let mut serve = Command::new(&keyhole);
    serve
        .arg("serve")
        .env("KEYHOLE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in &env {
        serve.env(k, v);
    }
    let server = Child(serve.spawn().map_err(|e| e.to_string())?);
    let runtime = home.join("run").join("keyhole");
    let (socket, token) = (runtime.join("keyhole.sock"), runtime.join("client.token"));
    wait_for(&token)?;
    let connect = || GatewayClient::connect(&socket, &token, Duration::from_secs(5));
    let mut client = connect().await.map_err(|e| e.to_string())?;
    let put = ApiOp::Put {
        name: "bench".into(),
        provider: None,
        scope: None,
        labels: BTreeMap::new(),
        value: value(64),
    };
    let ApiReply::Put { handle, .. } = client
        .call(put, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?
    else {
        return Err("put answered something else".into());
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_idle_kib = rss_kib(server.0.id()).unwrap_or(0);
    let resolve = |h: &str| ApiOp::Resolve {
        handles: vec![h.to_string()],
        purpose: "benchmark".into(),
    };

    // Warm up as every latency measurement here does: the first few hundred calls after the
    // gateway starts include its cold caches and the audit log's first pages.
    for _ in 0..effort.warmup {
        client
            .call(resolve(&handle), Duration::from_secs(10))
            .await
            .map_err(|e| e.to_string())?;
    }
    // Ten blocks of calls, each followed by a block of the disk's own durable writes, so that
    // both see the same machine: the disk's p99 is the baseline for the gateway's.
    let mut one = Samples::default();
    let mut disk = Samples::default();
    let mut floor = DiskFloor::new(home)?;
    let blocks = 10;
    let per_block = (effort.e2e / 2 / blocks).max(1);
    let ticks = cpu_ticks();
    let mut calling = Duration::ZERO;
    for _ in 0..blocks {
        let started = Instant::now();
        for _ in 0..per_block {
            let t = Instant::now();
            client
                .call(resolve(&handle), Duration::from_secs(10))
                .await
                .map_err(|e| e.to_string())?;
            one.push(t.elapsed());
        }
        calling += started.elapsed();
        for _ in 0..(per_block / 10).max(1) {
            disk.push(floor.write()?);
        }
    }
    let one_rate = (per_block * blocks) as f64 / calling.as_secs_f64();
    let one_steal = steal_since(ticks);

    let clients = 64;
    let per_client = (effort.e2e / clients).max(1);
    let mut tasks = tokio::task::JoinSet::new();
    let ticks = cpu_ticks();
    let started = Instant::now();
    for _ in 0..clients {
        let (socket, token, handle) = (socket.clone(), token.clone(), handle.clone());
        tasks.spawn(async move {
            let mut c = GatewayClient::connect(&socket, &token, Duration::from_secs(5))
                .await
                .map_err(|e| e.to_string())?;
            let mut s = Samples::default();
            for _ in 0..per_client {
                let t = Instant::now();
                let op = ApiOp::Resolve {
                    handles: vec![handle.clone()],
                    purpose: "benchmark".into(),
                };
                c.call(op, Duration::from_secs(30))
                    .await
                    .map_err(|e| e.to_string())?;
                s.push(t.elapsed());
            }
            Ok::<Samples, String>(s)
        });
    }
    let mut rss_load_kib = rss_idle_kib;
    let mut many = Samples::default();
    loop {
        tokio::select! {
            done = tasks.join_next() => match done {
                Some(r) => many.extend(r.map_err(|e| e.to_string())??),
                None => break,
            },
            () = tokio::time::sleep(Duration::from_millis(50)) => {
                rss_load_kib = rss_load_kib.max(rss_kib(server.0.id()).unwrap_or(0));
            }
        }
    }
    rss_load_kib = rss_load_kib.max(rss_kib(server.0.id()).unwrap_or(0));
    let many_rate = (per_client * clients) as f64 / started.elapsed().as_secs_f64();
    Ok(E2e {
        one,
        disk,
        one_rate,
        one_steal,
        many_steal: steal_since(ticks),
        many_rate,
        many,
        rss_idle_kib,
        rss_load_kib,
    })
}

async fn e2e_only(effort: Effort) -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let e = end_to_end(effort, &dir.path().join("home")).await?;
    Ok(format!(
        "1 client: {:.0}/s p50 {} p99 {} · {}\ndisk (4 KiB write + fsync, interleaved): {}\n\
         64 clients: {:.0}/s p50 {} p99 {} · {}\nRSS idle {} KiB, load {} KiB\n",
        e.one_rate,
        stats::fmt(e.one.p50()),
        stats::fmt(e.one.p99()),
        fmt_steal(e.one_steal),
        e.disk.summary(),
        e.many_rate,
        stats::fmt(e.many.p50()),
        stats::fmt(e.many.p99()),
        fmt_steal(e.many_steal),
        e.rss_idle_kib,
        e.rss_load_kib
    ))
}

async fn floor_only(effort: Effort, only: Option<Placement>) -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let memory = sibling("keyhole-provider-memory")?;
    let mut out = String::new();
    let placements = match only {
        None => {
            out.push_str(&format!(
                "CPU per resolve: {}\n",
                awake_costs(&memory, effort).await?
            ));
            placements()
        }
        Some(placement) => vec![placement],
    };
    for placement in placements {
        let f = paired_floor(effort, dir.path(), &memory, placement).await?;
        out.push_str(&format!(
            "{}:\n  keyhole p50 {} p99 {} · raw p50 {} p99 {} · {:.2}×\n  \
             JSON p50 {} p99 {} · {:.2}× bincode\n  \
             tokio ping-pong p50 {} p99 {} · keyhole is {:.2}× it\n  \
             tonic gRPC p50 {} p99 {} · keyhole is {:.2}× faster\n",
            placement.label(),
            stats::fmt(f.keyhole.p50()),
            stats::fmt(f.keyhole.p99()),
            stats::fmt(f.raw.p50()),
            stats::fmt(f.raw.p99()),
            f.keyhole.p50() / f.raw.p50(),
            stats::fmt(f.json.p50()),
            stats::fmt(f.json.p99()),
            f.json.p50() / f.keyhole.p50(),
            stats::fmt(f.event_loop.p50()),
            stats::fmt(f.event_loop.p99()),
            f.keyhole.p50() / f.event_loop.p50(),
            stats::fmt(f.grpc.p50()),
            stats::fmt(f.grpc.p99()),
            f.grpc.p50() / f.keyhole.p50(),
        ));
    }
    Ok(out)
}

/// The placements measured: pinned ones only where there are two CPUs to pin to.
fn placements() -> Vec<Placement> {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus >= 2 {
        vec![
            Placement::Scheduler,
            Placement::SameCore,
            Placement::CrossCore,
        ]
    } else {
        vec![Placement::Scheduler]
    }
}

// --- the table --------------------------------------------------------------------------------

struct Row {
    figure: String,
    measured: String,
    goal: String,
    met: Option<bool>,
}

fn row(
    figure: impl Into<String>,
    measured: impl Into<String>,
    goal: impl Into<String>,
    met: Option<bool>,
) -> Row {
    Row {
        figure: figure.into(),
        measured: measured.into(),
        goal: goal.into(),
        met,
    }
}

async fn run(effort: Effort, smoke: bool) -> Result<String, String> {
    let ticks = cpu_ticks();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let memory = sibling("keyhole-provider-memory")?;
    let file = sibling("keyhole-provider-file")?;
    eprintln!("floors...");
    let inproc = in_process(effort).await?;
    let raw64 = raw_socket(effort, 64, dir.path())?;
    let raw4k = raw_socket(effort, 4096, dir.path())?;

    // The file provider needs a store.
    let store_dir = dir.path().join("store");
    let key = dir.path().join("kek");
    let init = Command::new(&file)
        .args(["init", "--generate-key", "--store"])
        .arg(&store_dir)
        .arg("--key-file")
        .arg(&key)
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| e.to_string())?;
    if !init.success() {
        return Err("keyhole-provider-file init failed".into());
    }
    let file_args: Vec<OsString> = vec![
        "--store".into(),
        store_dir.into(),
        "--key-file".into(),
        key.into(),
    ];

    let mut rows = Vec::new();
    let mut kb = f64::NAN; // memory, bincode, 64 B
    for (label, program, args) in [
        ("memory", &memory, Vec::new()),
        ("file", &file, file_args.clone()),
    ] {
        for encoding in [Encoding::Bincode, Encoding::Json] {
            for size in [64usize, 4096] {
                eprintln!("keyhole round trip: {label} {encoding} {size} B...");
                let running = start_provider(program, &args, encoding).await?;
                store(&running.client, size).await?;
                let s = round_trip(&running.client, effort).await?;
                if (label, encoding, size) == ("memory", Encoding::Bincode, 64) {
                    kb = s.p50();
                }
                let floor = if size == 64 { &raw64 } else { &raw4k };
                let measured = format!(
                    "{} · {:.2}× the raw socket",
                    s.summary(),
                    s.p50() / floor.p50()
                );
                // The 1.25x goal is decided by the interleaved row below, not by this one.
                let (goal, met) = (String::new(), None);
                rows.push(row(
                    format!("keyhole resolve, {label}, {encoding}, {size} B, 1 in flight"),
                    measured,
                    goal,
                    met,
                ));
                if size == 64 {
                    let rate = throughput(&running.client, 64, effort.throughput).await?;
                    let (goal, met) = if label == "memory" && encoding == Encoding::Bincode {
                        ("≥ 100k resolves/s".to_string(), Some(rate >= 100_000.0))
                    } else {
                        (String::new(), None)
                    };
                    rows.push(row(format!("keyhole resolve, {label}, {encoding}, 64 B, 64 in flight, one connection"), format!("{:.0} resolves/s", rate), goal, met));
                }
                let _ = running
                    .client
                    .call(Op::Goodbye {}, Duration::from_secs(2))
                    .await;
            }
        }
    }

    // The interleaved comparisons, once per placement. The scheduler's placement comes first
    // and its keyhole figure is the one the spawn-per-call ratio uses.
    let mut pkh_scheduler = None;
    for placement in placements() {
        eprintln!(
            "interleaved, {}: raw socket, keyhole, tokio ping-pong, gRPC...",
            placement.label()
        );
        let f = paired_floor(effort, dir.path(), &memory, placement).await?;
        let (praw, pkh) = (&f.raw, &f.keyhole);
        let at = placement.label();
        rows.push(row(
            format!(
                "interleaved, {at}: keyhole resolve (memory, bincode, 64 B) vs raw socket \
                 ping-pong (64 B), 1 in flight"
            ),
            format!(
                "keyhole p50 {} · raw p50 {} · {:.2}×",
                stats::fmt(pkh.p50()),
                stats::fmt(praw.p50()),
                pkh.p50() / praw.p50()
            ),
            "≤ 1.25×",
            Some(pkh.p50() <= 1.25 * praw.p50()),
        ));
        rows.push(row(
            format!(
                "interleaved, {at}: the same ping-pong with tokio (one thread, epoll) at both ends"
            ),
            format!(
                "p50 {} · {:.2}× raw · keyhole is {:.2}× it",
                stats::fmt(f.event_loop.p50()),
                f.event_loop.p50() / praw.p50(),
                pkh.p50() / f.event_loop.p50()
            ),
            "(diagnostic: the event loop's share)",
            None,
        ));
        let json = f.json.p50();
        rows.push(row(
            format!("interleaved, {at}: keyhole resolve over JSON vs bincode (memory, 64 B)"),
            format!(
                "JSON p50 {} · bincode p50 {} · {:.2}×",
                stats::fmt(json),
                stats::fmt(pkh.p50()),
                json / pkh.p50()
            ),
            "≤ 1.5×",
            Some(json <= 1.5 * pkh.p50()),
        ));
        let g = &f.grpc;
        rows.push(row(
            format!("interleaved, {at}: tonic gRPC unary over UDS, 64 B, 1 in flight"),
            format!(
                "{} · keyhole is {:.2}× faster",
                g.summary(),
                g.p50() / pkh.p50()
            ),
            "keyhole ≥ 2.5× faster",
            Some(g.p50() >= 2.5 * pkh.p50()),
        ));
        if placement == Placement::Scheduler {
            pkh_scheduler = Some(pkh.p50());
        }
    }
    let pkh_p50 = pkh_scheduler.unwrap_or(kb);

    eprintln!("provider-file at 100 and 100,000 records...");
    rows.extend(file_store_rows(smoke, dir.path()).await?);

    eprintln!("spawn per call...");
    let sp = spawn_per_call(effort)?;
    rows.push(row(
        "spawn-per-call helper (stdin → stdout), 64 B",
        format!(
            "{} · keyhole is {:.1}× faster",
            sp.summary(),
            sp.p50() / pkh_p50
        ),
        "keyhole ≥ 10× faster",
        Some(sp.p50() >= 10.0 * pkh_p50),
    ));

    eprintln!("spawn + handshake...");
    let sh = spawn_handshake(&memory, effort).await?;
    rows.push(row(
        "provider spawn + handshake (memory)",
        sh.summary(),
        "≤ 10 ms p50",
        Some(sh.p50() <= 10e6),
    ));

    eprintln!("CPU per call while staying awake...");
    rows.push(row(
        "CPU per resolve (memory, bincode, 64 B, 1 in flight; readers stay awake up to 100 µs)",
        awake_costs(&memory, effort).await?,
        "(diagnostic: the price of staying awake)",
        None,
    ));

    eprintln!("gateway end to end...");
    let e = end_to_end(effort, &dir.path().join("home")).await?;
    rows.push(row(
        "end to end (client → gateway → file, policy, durable audit), 1 client",
        format!(
            "{:.0} resolves/s · {} · {}",
            e.one_rate,
            e.one.summary(),
            fmt_steal(e.one_steal)
        ),
        "p99 ≤ 1 ms",
        Some(e.one.p99() <= 1e6),
    ));
    rows.push(row(
        "interleaved with it: the disk alone, a 4 KiB write and fsync in the same directory",
        format!(
            "{} · end to end p50 is the disk's + {} · p99 the disk's + {}",
            e.disk.summary(),
            stats::fmt(e.one.p50() - e.disk.p50()),
            stats::fmt(e.one.p99() - e.disk.p99()),
        ),
        "(baseline: what one durable record costs here)",
        None,
    ));
    rows.push(row(
        "end to end, 64 clients",
        format!(
            "{:.0} resolves/s · {} · {}",
            e.many_rate,
            e.many.summary(),
            fmt_steal(e.many_steal)
        ),
        "≥ 20k resolves/s",
        Some(e.many_rate >= 20_000.0),
    ));
    rows.push(row(
        "gateway RSS",
        format!(
            "idle {:.1} MiB · under 64-client load {:.1} MiB",
            e.rss_idle_kib as f64 / 1024.0,
            e.rss_load_kib as f64 / 1024.0
        ),
        "≤ 20 MiB idle, ≤ 64 MiB under load",
        Some(e.rss_idle_kib <= 20 * 1024 && e.rss_load_kib <= 64 * 1024),
    ));

    let mut floors: Vec<Row> = [
        (
            "floor: in-process call to the memory provider, 64 B",
            &inproc,
        ),
        ("floor: raw Unix-socket ping-pong, 64 B", &raw64),
        ("floor: raw Unix-socket ping-pong, 4 KiB", &raw4k),
    ]
    .into_iter()
    .map(|(figure, s)| row(figure, s.summary(), "", None))
    .collect();
    floors.extend(rows);
    Ok(format!(
        "{}\nOver the whole run: {} (the hypervisor's share of this VM's CPU time).\n",
        table(floors, smoke),
        fmt_steal(steal_since(ticks))
    ))
}

/// provider-file's resolve at a small and a large store, alternating between the two, in process
/// and over the protocol.
async fn file_store_rows(smoke: bool, tmp: &Path) -> Result<Vec<Row>, String> {
    let dir = tempfile::tempdir_in(tmp).map_err(|e| e.to_string())?;
    let plan = if smoke {
        &file_store::SMOKE
    } else {
        &file_store::FULL
    };
    let fixtures = file_store::fixtures(plan, dir.path())?;
    let inproc = file_store::in_process(plan, &fixtures)?;
    let socket =
        file_store::over_socket(plan, &fixtures, &sibling("keyhole-provider-file")?).await?;
    let row_of = |s: &file_store::Scaling, how: String| {
        let ratio = s.large.p50() / s.small.p50();
        row(
            format!(
                "provider-file resolve at {} vs {} records, {how}",
                s.small_records, s.large_records
            ),
            format!(
                "p50 {:.0} ns · {:.0} ns · {:.2}×",
                s.small.p50(),
                s.large.p50(),
                ratio
            ),
            "≤ 1.2× (issue 3)",
            Some(ratio <= 1.2),
        )
    };
    Ok(vec![
        row_of(
            &socket,
            "over the protocol (bincode, 1 in flight, one core, interleaved blocks)".into(),
        ),
        row_of(
            &inproc,
            format!(
                "in process, the store alone (median of {} interleaved blocks)",
                plan.rounds
            ),
        ),
    ])
}

fn table(rows: Vec<Row>, smoke: bool) -> String {
    let mut table = String::new();
    if smoke {
        table.push_str("SMOKE RUN: a few iterations each; these numbers mean nothing.\n\n");
    }
    table.push_str("| figure | measured | goal | met |\n|---|---|---|---|\n");
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        table.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            r.figure, r.measured, r.goal, met
        ));
    }
    table
}
