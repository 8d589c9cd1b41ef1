//! Dataset runs on a real Slurm (issue 30): a single-node cluster (munged, slurmctld and slurmd,
//! Debian's `slurm-wlm` and `munge`, configured in a temporary folder on free ports) runs
//! `scripts/slurm/submit.sh`: a 4-task array of `scripts/slurm/explain.sbatch`, one shard each, then
//! `gradcam merge` as a job that waits for the array. The merged records must be the unsharded
//! run's. The daemons are stopped when the test ends, also when it fails.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{gradcam, ok, repo};

/// How long the array and the merge may take before the test gives up (they take seconds).
const JOB_TIMEOUT: Duration = Duration::from_secs(600);
/// How long each daemon may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

const DAEMONS: [&str; 3] = ["munged", "slurmctld", "slurmd"];
const CLIENTS: [&str; 5] = ["sbatch", "squeue", "scontrol", "scancel", "sinfo"];

/// Where `name` is on the PATH or in the sbin folders (which a root shell may not have on it).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The programs, or a failure that says how to install them (the test never skips).
fn programs() -> Vec<PathBuf> {
    let missing: Vec<&str> = DAEMONS.iter().chain(&CLIENTS).copied().filter(|p| which(p).is_none()).collect();
    assert!(
        missing.is_empty(),
        "Slurm is not installed (missing {}): the Slurm test runs a real single-node cluster; \
         install it as .ci/run does: apt-get install -y -qq slurm-wlm munge",
        missing.join(", ")
    );
    DAEMONS.iter().map(|p| which(p).unwrap()).collect()
}

/// A TCP port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The last `n` lines of a file, or why there are none.
fn tail(path: &Path, n: usize) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("({e})"),
    }
}

/// A running single-node cluster in a temporary folder. Dropping it cancels its jobs and kills
/// its daemons.
struct Cluster {
    dir: tempfile::TempDir,
    daemons: RefCell<Vec<(&'static str, Child)>>,
}

impl Cluster {
    fn start() -> Cluster {
        let [munged, slurmctld, slurmd] = <[PathBuf; 3]>::try_from(programs()).unwrap();
        // slurmd runs jobs as their owners and slurmctld as SlurmUser: the test runs as root (CI does).
        let uid = fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap_or(0);
        assert_eq!(uid, 0, "the Slurm test starts slurmd, which needs root (.ci/run runs as root)");
        let dir = tempfile::Builder::new().prefix("gradcam-slurm").tempdir().unwrap();
        let cluster = Cluster { dir, daemons: RefCell::new(Vec::new()) };
        for sub in ["munge", "socket", "state", "spool", "log"] {
            fs::create_dir(cluster.path(sub)).unwrap();
        }
        // munged wants the socket's folder to be searchable by all and the key readable by it only.
        fs::set_permissions(cluster.path("socket"), fs::Permissions::from_mode(0o755)).unwrap();
        let key = cluster.path("munge/munge.key");
        let mut bytes = vec![0u8; 1024];
        std::io::Read::read_exact(&mut fs::File::open("/dev/urandom").unwrap(), &mut bytes).unwrap();
        fs::write(&key, bytes).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).unwrap();
        fs::write(cluster.path("slurm.conf"), cluster.config()).unwrap();

        let (dir, socket) = (cluster.dir.path().to_owned(), cluster.path("socket/munge.sock"));
        let arg = |name: &str, p: &str| format!("--{name}={}", dir.join(p).display());
        cluster.spawn(
            "munged",
            &munged,
            &[
                // --force: as root, and with the key in a temporary folder.
                "--foreground".into(),
                "--force".into(),
                arg("key-file", "munge/munge.key"),
                arg("socket", "socket/munge.sock"),
                arg("pid-file", "munge/munged.pid"),
                arg("seed-file", "munge/munged.seed"),
                arg("log-file", "munge/munged.log"), // in the foreground it logs to standard error
            ],
        );
        cluster.until("munged to create its socket", || socket.exists().then_some(()));
        let conf = cluster.path("slurm.conf").display().to_string();
        cluster.spawn("slurmctld", &slurmctld, &["-D".into(), "-f".into(), conf.clone()]);
        cluster.until("slurmctld to answer", || {
            let o = cluster.run("scontrol", &["ping"]);
            String::from_utf8_lossy(&o.stdout).contains("is UP").then_some(())
        });
        cluster.spawn("slurmd", &slurmd, &["-D".into(), "-f".into(), conf]);
        cluster.until("the node to be idle", || {
            let o = cluster.run("sinfo", &["--noheader", "--format=%T"]);
            (String::from_utf8_lossy(&o.stdout).trim() == "idle").then_some(())
        });
        cluster
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// slurm.conf for one node, this machine, with the CPUs and memory `slurmd -C` finds.
    fn config(&self) -> String {
        let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        let host = host.trim().split('.').next().unwrap().to_owned();
        let o = Command::new(which("slurmd").unwrap()).arg("-C").output().expect("slurmd -C runs");
        let hardware = String::from_utf8_lossy(&o.stdout);
        let node = hardware.lines().find(|l| l.starts_with("NodeName=")).unwrap_or_else(|| {
            panic!("slurmd -C printed no NodeName line: {hardware}{}", String::from_utf8_lossy(&o.stderr))
        });
        // "NodeName=HOST CPUs=2 Boards=1 ... RealMemory=24105": keep the hardware, name the address.
        let hardware = node.split_once(' ').map_or("", |(_, rest)| rest);
        let d = |p: &str| self.path(p).display().to_string();
        let mut c = String::new();
        let mut line = |k: &str, v: &str| writeln!(c, "{k}={v}").unwrap();
        line("ClusterName", "gradcamtest");
        // The controller must be this host by name; its address avoids depending on DNS.
        line("SlurmctldHost", &format!("{host}(127.0.0.1)"));
        let ctld = free_port();
        let slurmd = std::iter::repeat_with(free_port).find(|&p| p != ctld).unwrap();
        line("SlurmctldPort", &ctld.to_string());
        line("SlurmdPort", &slurmd.to_string());
        line("AuthType", "auth/munge");
        line("CredType", "cred/munge");
        // Our munged, not the system's: its socket. A requeued job waits for the credentials of its
        // last run to expire before it starts again: 10 s instead of 120.
        line("AuthInfo", &format!("socket={},cred_expire=10", d("socket/munge.sock")));
        line("SlurmUser", "root");
        line("SlurmdUser", "root");
        line("StateSaveLocation", &d("state"));
        line("SlurmdSpoolDir", &d("spool"));
        line("SlurmctldPidFile", &d("slurmctld.pid"));
        line("SlurmdPidFile", &d("slurmd.pid"));
        // No log files: in the foreground (-D) the daemons log to standard error, into log/NAME.out.
        line("SlurmctldDebug", "info");
        line("SlurmdDebug", "info");
        // No cgroups in a container: track a job's processes through /proc, bind no CPUs.
        line("ProctrackType", "proctrack/linuxproc");
        line("TaskPlugin", "task/none");
        line("SelectType", "select/cons_tres");
        line("SelectTypeParameters", "CR_Core");
        // Pending jobs are looked at every 2 s, not 60 (the requeued job, once its wait is over).
        line("SchedulerParameters", "sched_interval=2,bf_interval=2");
        // No slurmdbd: no accounting (jobs are followed through scontrol).
        line("AccountingStorageType", "accounting_storage/none");
        line("JobAcctGatherType", "jobacct_gather/none");
        line("MpiDefault", "none");
        line("MailProg", "/bin/true");
        // The node comes up when slurmd registers, whatever state it was in.
        line("ReturnToService", "2");
        // Finished jobs stay visible to scontrol for 5 minutes (Slurm's default, said out loud).
        line("MinJobAge", "300");
        line("NodeName", &format!("{host} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN"));
        line("PartitionName", "debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP");
        c
    }

    /// Starts a daemon in the foreground, as a child of this test. `setpriv --pdeathsig` kills it
    /// if the test process dies without running `Drop` (killed by a timeout, say).
    fn spawn(&self, name: &'static str, program: &Path, args: &[String]) {
        let out = fs::File::create(self.path(&format!("log/{name}.out"))).unwrap();
        let mut cmd = match which("setpriv") {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "KILL", "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        self.clean_env(&mut cmd);
        let child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        self.daemons.borrow_mut().push((name, child));
    }

    /// Commands talk to this cluster only: SLURM_CONF is ours, and nothing of an enclosing Slurm
    /// job (SLURM_JOB_ID...) leaks in.
    fn clean_env(&self, cmd: &mut Command) {
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SLURM_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("SLURM_CONF", self.path("slurm.conf"));
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(which(program).unwrap_or_else(|| PathBuf::from(program)));
        self.clean_env(&mut cmd);
        cmd
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program).args(args).output().unwrap_or_else(|e| panic!("{program} runs: {e}"))
    }

    /// Polls `ready` until it gives a value; fails with the daemons' logs after START_TIMEOUT or
    /// when a daemon has exited.
    fn until<T>(&self, what: &str, mut ready: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = ready() {
                return v;
            }
            if let Some(dead) = self.dead() {
                panic!("waiting for {what}: {dead}\n{}", self.logs());
            }
            assert!(start.elapsed() < START_TIMEOUT, "waiting for {what}: timed out after {START_TIMEOUT:?}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Which daemon has exited, if one has.
    fn dead(&self) -> Option<String> {
        let mut daemons = self.daemons.borrow_mut();
        daemons.iter_mut().find_map(|(name, child)| match child.try_wait() {
            Ok(Some(status)) => Some(format!("{name} exited ({status})")),
            _ => None,
        })
    }

    /// The configuration and the daemons' logs.
    fn logs(&self) -> String {
        let mut s = format!("--- slurm.conf\n{}", fs::read_to_string(self.path("slurm.conf")).unwrap_or_default());
        for name in DAEMONS {
            write!(s, "\n--- {name}'s log (last 60 lines)\n{}", tail(&self.path(&format!("log/{name}.out")), 60)).unwrap();
        }
        s
    }

    /// `scontrol show job ID`'s fields for each of its jobs (an array job has one per task).
    fn jobs(&self, id: &str) -> Vec<Vec<(String, String)>> {
        let o = self.run("scontrol", &["--oneliner", "show", "job", id]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.starts_with("JobId="))
            .map(|l| {
                l.split_whitespace().filter_map(|f| f.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
            })
            .collect()
    }

    /// The job's state once it has finished (COMPLETED, FAILED, CANCELLED...), or why not: a daemon
    /// exited, or `timeout` passed.
    fn wait(&self, id: &str, timeout: Duration) -> Result<String, String> {
        let start = Instant::now();
        loop {
            let state = self.jobs(id).first().and_then(|job| job.iter().find(|(k, _)| k == "JobState").map(|(_, v)| v.clone()));
            match state.as_deref() {
                Some("PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING" | "REQUEUED" | "RESIZING" | "SUSPENDED") | None => {}
                Some(done) => return Ok(done.to_owned()),
            }
            if let Some(dead) = self.dead() {
                return Err(format!("waiting for job {id}: {dead}"));
            }
            if start.elapsed() > timeout {
                return Err(format!("job {id} did not finish in {timeout:?} (state {state:?})"));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Cancel what still runs (on a failure) and give slurmd a moment to end the jobs' steps,
        // so that no job outlives the cluster; then kill the daemons, slurmd first.
        let mut daemons = std::mem::take(self.daemons.get_mut());
        if daemons.len() == DAEMONS.len() {
            let _ = self.command("scancel").args(["--user=root", "--full"]).output();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(15) {
                let o = self.command("squeue").args(["--noheader", "--states=RUNNING,COMPLETING"]).output();
                if o.map_or(true, |o| !o.status.success() || o.stdout.iter().all(u8::is_ascii_whitespace)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        for (_, child) in daemons.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Floats equal within 1e-6, everything else exactly; `at` names the place for the message.
fn same(a: &Value, b: &Value, at: &str) -> Result<(), String> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            if (x - y).abs() <= 1e-6 {
                Ok(())
            } else {
                Err(format!("{at}: {x} vs {y}"))
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            if x.len() != y.len() {
                return Err(format!("{at}: {} vs {} elements", x.len(), y.len()));
            }
            x.iter().zip(y).enumerate().try_for_each(|(i, (x, y))| same(x, y, &format!("{at}[{i}]")))
        }
        (Value::Object(x), Value::Object(y)) => {
            let (kx, ky): (Vec<&String>, Vec<&String>) = (x.keys().collect(), y.keys().collect());
            if kx != ky {
                return Err(format!("{at}: fields {kx:?} vs {ky:?}"));
            }
            x.iter().try_for_each(|(k, v)| same(v, &y[k], &format!("{at}.{k}")))
        }
        _ if a == b => Ok(()),
        _ => Err(format!("{at}: {a} vs {b}")),
    }
}

/// Every record of `got` is the `expected` one (same() each); `what` names them for the message.
fn all_same(got: &[Value], expected: &[Value], what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}: {} records, expected {}", got.len(), expected.len());
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        if let Err(why) = same(g, e, &format!("record {i}")) {
            panic!("{what} differ from the unsharded run's: {why}\n{g}\n{e}");
        }
    }
}

fn records(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display()))).collect()
}

/// Everything under `dir` (the jobs' logs), for a failure's message.
fn outputs(dir: &Path) -> String {
    let mut s = String::new();
    let mut files: Vec<PathBuf> = fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
    files.sort();
    for f in files {
        write!(s, "\n--- {} (last 40 lines)\n{}", f.display(), tail(&f, 40)).unwrap();
    }
    s
}

#[test]
fn a_slurm_array_and_its_merge_give_the_unsharded_records() {
    let started = Instant::now();
    programs(); // fails first, with the fix, when Slurm is not installed
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("scenes");
    let cfg = gradcam_scenes::Config { n: 30, seed: 11, fractions: [0.0, 0.0, 1.0], size: 64, bias: None };
    gradcam_scenes::dataset::write(&data, &cfg, &|| {}).unwrap();
    let mut images: Vec<PathBuf> = fs::read_dir(data.join("test/images")).unwrap().map(|e| e.unwrap().path()).collect();
    images.sort();
    assert_eq!(images.len(), 30);
    // A broken input in the middle: an error record, in its place, in both runs.
    let broken = tmp.path().join("broken.png");
    fs::write(&broken, "not a PNG").unwrap();
    images.insert(13, broken);
    let list = tmp.path().join("inputs.txt");
    fs::write(&list, images.iter().map(|p| format!("{}\n", p.display())).collect::<String>()).unwrap();
    let (list, model) = (list.to_str().unwrap(), repo("models/captioner"));
    let model = model.to_str().unwrap();

    let a = tmp.path().join("unsharded");
    let a_str = a.to_str().unwrap();
    ok(&gradcam(&["caption", "--model", model, "--batch-size", "4", "--inputs", list, "--out", a_str]));
    ok(&gradcam(&["merge", a_str]));
    let expected = records(&a.join("records.jsonl"));
    assert_eq!(expected.len(), images.len());
    let captioned = expected.iter().filter(|r| r["words"].as_array().is_some_and(|w| !w.is_empty() && w[0]["cam"].is_array())).count();
    assert_eq!(captioned, images.len() - 1, "every image but the broken one has a caption and maps");
    let local = started.elapsed();

    let cluster = Cluster::start();
    let up = started.elapsed();
    let b = tmp.path().join("slurm");
    let o = cluster
        .command("bash")
        .arg(repo("scripts/slurm/submit.sh"))
        .args(["4", list, b.to_str().unwrap(), "caption", "--model", model, "--batch-size", "4"])
        .env("GRADCAM", env!("CARGO_BIN_EXE_gradcam"))
        .output()
        .unwrap();
    let submitted = String::from_utf8_lossy(&o.stdout).into_owned();
    let ids: Vec<&str> = submitted.split_whitespace().collect();
    assert!(
        o.status.success() && ids.len() == 2,
        "scripts/slurm/submit.sh failed: {submitted}{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        cluster.logs()
    );
    let (array, merge) = (ids[0].to_owned(), ids[1].to_owned());
    let context = || {
        let mut s = String::new();
        for id in [&array, &merge] {
            let o = cluster.run("scontrol", &["--oneliner", "show", "job", id]);
            write!(s, "--- scontrol show job {id}\n{}", String::from_utf8_lossy(&o.stdout)).unwrap();
        }
        s + &outputs(&b.join("slurm"))
    };
    let state = cluster.wait(&merge, JOB_TIMEOUT).unwrap_or_else(|why| panic!("{why}\n{}\n{}", context(), cluster.logs()));
    assert_eq!(state, "COMPLETED", "the merge job (after the array's tasks) ended {state}\n{}\n{}", context(), cluster.logs());
    // Each task: its own shard, run once.
    let tasks = cluster.jobs(&array);
    assert_eq!(tasks.len(), 4, "{}", context());
    for task in &tasks {
        let get = |k: &str| task.iter().find(|(key, _)| key == k).map_or("", |(_, v)| v.as_str());
        assert_eq!((get("JobState"), get("ExitCode")), ("COMPLETED", "0:0"), "{}", context());
    }
    for i in 0..4 {
        let shard = records(&b.join(format!("records-{i}-of-4.jsonl")));
        let indices: Vec<u64> = shard.iter().map(|r| r["index"].as_u64().unwrap()).collect();
        let mine: Vec<u64> = (0..images.len() as u64).filter(|j| j % 4 == i).collect();
        assert_eq!(indices, mine, "shard {i} of 4");
    }
    let done = started.elapsed();
    let got = records(&b.join("records.jsonl"));
    assert_eq!(got.len(), expected.len(), "{}", context());
    all_same(&got, &expected, "the Slurm run's records");
    assert!(got[13].get("error").is_some(), "the broken input's record: {}", got[13]);
    let summary: Value = serde_json::from_str(&fs::read_to_string(b.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["count"], images.len(), "{summary}");
    assert_eq!(summary["errors"], 1, "{summary}");

    // Preemption: task 2 was killed in the middle of writing its fourth record (its file keeps
    // three records and half a line) and Slurm requeues it. It runs again with --resume: redoes
    // the cut line and the rest, appends to its log, and the merge is the same again.
    let shard = b.join("records-2-of-4.jsonl");
    let text = fs::read_to_string(&shard).unwrap();
    let cut: usize = text.lines().take(3).map(|l| l.len() + 1).sum::<usize>() + text.lines().nth(3).unwrap().len() / 2;
    fs::write(&shard, &text[..cut]).unwrap();
    let task = format!("{array}_2");
    let o = cluster.run("scontrol", &["requeue", &task]);
    assert!(o.status.success(), "scontrol requeue {task}: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let requeued = Instant::now();
    let state = cluster.wait(&task, JOB_TIMEOUT).unwrap_or_else(|why| panic!("{why}\n{}\n{}", context(), cluster.logs()));
    assert_eq!(state, "COMPLETED", "the requeued task {task} ended {state}\n{}\n{}", context(), cluster.logs());
    let requeued = requeued.elapsed();
    let log = fs::read_to_string(b.join(format!("slurm/explain-{task}.out"))).unwrap();
    assert!(log.contains("attempt 1") && log.contains("attempt 2"), "task 2's log has both attempts (--open-mode=append):\n{log}");
    // The redone records come from other batches than the first time: equal within 1e-6.
    let redone = records(&shard);
    assert_eq!(redone.len(), text.lines().count(), "task 2's records after the requeue:\n{}", fs::read_to_string(&shard).unwrap());
    ok(&gradcam(&["merge", b.to_str().unwrap()]));
    all_same(&records(&b.join("records.jsonl")), &expected, "the records merged after the requeue");
    drop(cluster);
    eprintln!("slurm: unsharded run {local:.1?}, cluster up {:.1?}, array + merge {:.1?}, requeued task {requeued:.1?}", up - local, done - up);
}
