//! Keeping the CPUs awake while a CPU step runs.
//!
//! A CPU step is thousands of parallel passes, and between two of them rayon's workers go
//! to sleep within microseconds. A CPU with nothing to run halts; in a virtual machine whose
//! host is busy, a halted virtual CPU gives its physical CPU back and waits to be scheduled
//! again when the next pass wakes its worker. On the 2-core KVM machine the benchmarks run
//! on, in its busy hours, that waiting was a third of the step's CPU time (counted as
//! "steal" in `/proc/stat`) and the step took 1.6x as long.
//!
//! [`awake`] returns a guard; while one is held, one thread per worker spins at the lowest
//! scheduling priority (Linux `SCHED_IDLE`), so a CPU whose worker sleeps runs the spinner
//! instead of halting. A worker that wakes takes its CPU back at once, since the kernel
//! preempts an idle-class thread for any other. This is what OpenMP's active wait policy
//! gives torch's threads, without changing rayon. The spinners are started on the first
//! guard and park when the last guard is dropped, so a host that is not training sees no
//! CPU use.
//!
//! [`Awake::run`] goes further for the work itself: it runs it on one of rayon's workers
//! while the pool's other workers poll for work instead of sleeping, so a parallel pass
//! finds them awake and wakes no thread (a sleeping worker costs a futex wake and a
//! reschedule, tens of microseconds in a virtual machine, thousands of times a step). That
//! is the whole of OpenMP's active wait; it is used only where the pool has no more workers
//! than the machine has cores, since a polling thread on a core's second hardware thread
//! would take from the one computing beside it.
//!
//! Where the work runs decides where its memory comes from: glibc gives each thread that
//! allocates its own arena, and an arena other than the main thread's grows in heaps of at
//! most 64 MiB, in which a step's activations of several MiB to 32 MiB leave holes that
//! the main thread's one contiguous heap would have reused (SD 1.5 at 512 px: a peak of
//! 4,811 MiB run on a worker against 4,290 on the main thread, the same step time). A
//! program whose main thread trains calls [`init_main_thread`] first, as the `sdti`
//! command and the benchmark do: the main thread becomes one of rayon's workers, and
//! [`Awake::run`] runs the work on it. A host's own thread is not a worker, and its work
//! runs on one of the pool's.
//!
//! `SDTI_CPU_WAIT=passive` turns both off (`active`, the default, leaves them on); on systems
//! other than Linux there is no idle class and nothing spins between passes.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};

/// How many guards are held.
static HELD: AtomicUsize = AtomicUsize::new(0);

struct Spinners {
    /// Wakes parked spinners when the first guard is taken.
    wake: Condvar,
    lock: Mutex<()>,
}

static SPINNERS: OnceLock<Option<Spinners>> = OnceLock::new();

/// Keeps the CPUs awake until dropped (see the module's documentation).
pub struct Awake {
    /// Holds the idle-class spinners.
    active: bool,
    /// [`Awake::run`] polls.
    poll: bool,
}

/// The environment variable that sets how long the threads of candle's element-wise pool
/// (`candle-bp-N`, for element-wise ops on at least 64K values) spin after an op before
/// they park: 25,000 pauses unless set, about a millisecond here, in which such a thread
/// takes a CPU from the step's own threads after each of the few such ops of a step.
pub const CANDLE_SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// What [`init_main_thread`] sets [`CANDLE_SPIN_LIMIT_VAR`] to: a few microseconds.
const CANDLE_SPIN_LIMIT: &str = "100";

/// Readies a program's main thread for CPU work: sets [`CANDLE_SPIN_LIMIT_VAR`] unless the
/// environment has it, and makes the thread the first worker of rayon's global pool (see
/// `join_global_pool`). Call it first thing in `main`, while the process has no other
/// thread (it may change the environment) and before anything uses rayon or candle. Whether
/// the thread joined the pool.
pub fn init_main_thread() -> bool {
    if std::env::var_os(CANDLE_SPIN_LIMIT_VAR).is_none() {
        std::env::set_var(CANDLE_SPIN_LIMIT_VAR, CANDLE_SPIN_LIMIT);
    }
    join_global_pool()
}

/// Makes the calling thread the first worker of rayon's global pool, which then has the
/// usual number of threads in all (`RAYON_NUM_THREADS`, else one per logical CPU), so that
/// work this thread hands to [`Awake::run`] stays on it (module documentation). False, and
/// nothing changed, when the global pool already exists or would have one thread: this
/// thread runs a pool's jobs only while it waits in rayon, so another thread's parallel
/// work would wait for it.
fn join_global_pool() -> bool {
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    threads > 1
        && rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .use_current_thread()
            .build_global()
            .is_ok()
}

impl Awake {
    /// Runs `f` on a worker of rayon's pool (the calling thread when it is one) while the
    /// pool's other workers poll for work instead of sleeping, when polling applies (module
    /// documentation); otherwise `f` runs on the calling thread. `f`'s panic reaches the
    /// caller once the pollers have stopped.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        if !self.poll {
            return f();
        }
        /// Stops the pollers when `f` returns or unwinds: the scope waits for them.
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let stop = AtomicBool::new(false);
        rayon::scope(|scope| {
            let runner = rayon::current_thread_index();
            let stop = &stop;
            scope.spawn_broadcast(move |_, worker| {
                if Some(worker.index()) == runner {
                    return;
                }
                // Runs whatever work the pool has (`f`'s parallel passes) until `f` is done.
                while !stop.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
            });
            let _stop = Stop(stop);
            f()
        })
    }
}

impl Drop for Awake {
    fn drop(&mut self) {
        if self.active {
            HELD.fetch_sub(1, Ordering::Release);
        }
    }
}

/// Whether `SDTI_CPU_WAIT` asks for spinning (`active`, or unset) or not (`passive`).
///
/// # Errors
/// Another value, with what it may be.
fn wait_policy_active() -> crate::error::Result<bool> {
    parse_wait_policy(std::env::var("SDTI_CPU_WAIT").ok().as_deref())
}

/// [`wait_policy_active`] for the variable's value (`None`: unset).
fn parse_wait_policy(value: Option<&str>) -> crate::error::Result<bool> {
    let Some(v) = value else {
        return Ok(true);
    };
    match v.trim().to_ascii_lowercase().as_str() {
        "" | "active" => Ok(true),
        "passive" => Ok(false),
        _ => Err(crate::error::Error::input(
            "SDTI_CPU_WAIT",
            format!("'{v}' is not a wait policy: it is 'active' (the default) or 'passive'"),
        )),
    }
}

/// A guard that keeps the CPUs awake while held, for work on `device`: nothing spins for
/// another device, when the policy is passive, on systems without an idle scheduling
/// class, or when the spinners could not be started.
///
/// # Errors
/// An `SDTI_CPU_WAIT` value that is neither `active` nor `passive`.
pub fn awake(device: &candle_core::Device) -> crate::error::Result<Awake> {
    if !device.is_cpu() || !wait_policy_active()? {
        return Ok(Awake {
            active: false,
            poll: false,
        });
    }
    let poll = polls(rayon::current_num_threads(), num_cpus::get_physical());
    let Some(spinners) = SPINNERS.get_or_init(start) else {
        return Ok(Awake {
            active: false,
            poll,
        });
    };
    if HELD.fetch_add(1, Ordering::AcqRel) == 0 {
        let _held = spinners.lock.lock().unwrap_or_else(PoisonError::into_inner);
        spinners.wake.notify_all();
    }
    Ok(Awake { active: true, poll })
}

/// Whether [`Awake::run`] polls with a pool of `workers` on a machine of `cores` physical
/// cores: with more than one worker and no more workers than cores.
fn polls(workers: usize, cores: usize) -> bool {
    workers > 1 && workers <= cores
}

/// Starts one spinner per rayon worker; `None` where no idle class exists or no thread
/// could be started.
fn start() -> Option<Spinners> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let threads = rayon::current_num_threads().max(1);
    let mut started = 0;
    for i in 0..threads {
        let spawned = std::thread::Builder::new()
            .name(format!("sdti-awake-{i}"))
            .stack_size(64 << 10)
            .spawn(spin);
        if spawned.is_ok() {
            started += 1;
        }
    }
    (started > 0).then(|| Spinners {
        wake: Condvar::new(),
        lock: Mutex::new(()),
    })
}

/// A spinner's life: idle class, then spin while a guard is held and park otherwise.
fn spin() {
    if !idle_class() {
        return;
    }
    loop {
        while HELD.load(Ordering::Acquire) > 0 {
            // A yield, not a pause: a worker that yields its CPU while it waits (rayon
            // does, before it sleeps) is runnable, not woken, so the kernel does not preempt
            // this thread for it; only a yield here hands the CPU back at once instead of at
            // the next scheduler tick, milliseconds later.
            std::thread::yield_now();
        }
        let Some(Some(spinners)) = SPINNERS.get() else {
            // Not yet published by `awake` (the first guard): look again shortly.
            std::thread::sleep(std::time::Duration::from_millis(1));
            continue;
        };
        let held = spinners.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let _held = spinners
            .wake
            .wait_while(held, |_| HELD.load(Ordering::Acquire) == 0)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

/// Moves the calling thread to the idle scheduling class; false where there is none.
#[cfg(target_os = "linux")]
fn idle_class() -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call, and pid 0 is the calling thread.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn idle_class() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn the_wait_policy_is_read_or_refused() {
        assert!(parse_wait_policy(None).unwrap());
        assert!(parse_wait_policy(Some("active")).unwrap());
        assert!(parse_wait_policy(Some(" Passive ")).map(|a| !a).unwrap());
        let err = parse_wait_policy(Some("spin")).unwrap_err().to_string();
        assert!(
            err.contains("SDTI_CPU_WAIT") && err.contains("'spin'"),
            "{err}"
        );
        assert!(err.contains("passive"), "{err}");
    }

    /// A guard that polls in [`Awake::run`] and holds no spinners.
    const POLLED: Awake = Awake {
        active: false,
        poll: true,
    };

    /// Set in the process [`a_joined_thread_runs_the_work_itself`] starts, to the candle
    /// spin limit that process should find after [`init_main_thread`].
    const JOINED_CHILD: &str = "SDTI_TEST_JOINED_CHILD";

    /// In a process of its own (this test binary again, running this test alone, as a
    /// program's `main` joins before anything uses rayon): the joining thread becomes the
    /// pool's first worker, and `run` runs the work on it while the other worker takes
    /// its share of the parallel passes.
    #[test]
    fn a_joined_thread_runs_the_work_itself() {
        const NAME: &str = "model::awake::tests::a_joined_thread_runs_the_work_itself";
        let Some(expected) = std::env::var_os(JOINED_CHILD) else {
            // Unset, the spin limit is set; a user's value is kept.
            for user in [None, Some("7")] {
                let exe = std::env::current_exe().expect("test executable path");
                let mut child = std::process::Command::new(exe);
                child
                    .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
                    .env(JOINED_CHILD, user.unwrap_or(CANDLE_SPIN_LIMIT))
                    .env("RAYON_NUM_THREADS", "2")
                    .env_remove(CANDLE_SPIN_LIMIT_VAR);
                if let Some(user) = user {
                    child.env(CANDLE_SPIN_LIMIT_VAR, user);
                }
                let out = child.output().expect("the test binary runs");
                let stdout = String::from_utf8_lossy(&out.stdout);
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(out.status.success(), "{stdout}\n{stderr}");
                assert!(stdout.contains("joined and ran here"), "{stdout}\n{stderr}");
            }
            return;
        };
        assert!(init_main_thread());
        assert_eq!(std::env::var_os(CANDLE_SPIN_LIMIT_VAR), Some(expected));
        assert_eq!(rayon::current_thread_index(), Some(0));
        assert_eq!(rayon::current_num_threads(), 2);
        assert!(!join_global_pool(), "the global pool was built twice");
        let here = std::thread::current().id();
        let (ran_on, workers) = POLLED.run(|| {
            let workers: std::collections::HashSet<_> = (0..64)
                .into_par_iter()
                .map(|_| {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    rayon::current_thread_index()
                })
                .collect();
            (std::thread::current().id(), workers)
        });
        assert_eq!(ran_on, here, "the work left the joined thread");
        // (`run` returned, so its scope saw the poller stop.)
        assert_eq!(workers.len(), 2, "one worker did every part: {workers:?}");
        println!("joined and ran here");
    }

    #[test]
    fn polling_only_where_every_worker_has_a_core() {
        assert!(polls(2, 2));
        assert!(polls(8, 16));
        assert!(!polls(16, 8), "two workers on a core's hardware threads");
        assert!(!polls(1, 4), "nobody to poll");
    }

    /// `f`'s value if it returns within a minute on a thread of its own (`None`: a poller
    /// that never stops holds its worker, and `f` or the scope waits for good).
    fn in_a_minute<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(60)).ok()
    }

    /// Whether every worker of rayon's pool takes a job within a minute.
    fn workers_free() -> bool {
        in_a_minute(|| rayon::broadcast(|_| ())).is_some()
    }

    #[test]
    fn run_polls_on_a_worker_returns_and_unwinds_and_frees_the_pool() {
        let (on_worker, sum) = in_a_minute(|| {
            POLLED.run(|| {
                let sum: u64 = (0..10_000u64).into_par_iter().map(|i| i * i).sum();
                (rayon::current_thread_index().is_some(), sum)
            })
        })
        .expect("run did not return");
        assert!(on_worker, "f ran outside the pool");
        assert_eq!(sum, (0..10_000u64).map(|i| i * i).sum::<u64>());
        assert!(workers_free(), "a poller kept its worker after f returned");

        let unwound = in_a_minute(|| std::panic::catch_unwind(|| POLLED.run(|| panic!("in f"))))
            .expect("run did not return after f panicked");
        assert!(unwound.is_err(), "f's panic did not reach the caller");
        assert!(workers_free(), "a poller kept its worker after f panicked");

        let plain = Awake {
            active: false,
            poll: false,
        };
        assert_eq!(plain.run(rayon::current_thread_index), None);
    }

    /// Each spinner's (thread id, state letter, scheduling policy) from `/proc`.
    #[cfg(target_os = "linux")]
    fn spinners() -> Vec<(String, char, u32)> {
        let mut out = Vec::new();
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return out;
        };
        for task in tasks.flatten() {
            let dir = task.path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if !comm.starts_with("sdti-awake-") {
                continue;
            }
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
            // The fields after the command's closing parenthesis, from field 3, the state;
            // the policy is field 41 (proc(5)).
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let state = fields.first().and_then(|f| f.chars().next()).unwrap_or('?');
            let policy = fields
                .get(41 - 3)
                .and_then(|f| f.parse::<u32>().ok())
                .unwrap_or(u32::MAX);
            out.push((
                task.file_name().to_string_lossy().into_owned(),
                state,
                policy,
            ));
        }
        out
    }

    /// Polls `/proc` until `ok` holds for the spinners (true) or `secs` pass (false).
    #[cfg(target_os = "linux")]
    fn within(secs: u64, ok: impl Fn(&[(String, char, u32)]) -> bool) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if ok(&spinners()) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn spinners_spin_in_the_idle_class_while_a_guard_is_held_and_park_after() {
        if !wait_policy_active().unwrap_or(false) {
            return; // the environment asked for passive waiting
        }
        let threads = rayon::current_num_threads();
        let guard = awake(&candle_core::Device::Cpu).unwrap();
        // Spinning threads are runnable ('R') whether or not a CPU is free for them, so
        // the check does not depend on what else this process runs.
        let spinning = within(20, |s| {
            s.len() == threads
                && s.iter()
                    .all(|(_, state, policy)| *state == 'R' && *policy == libc::SCHED_IDLE as u32)
        });
        assert!(
            spinning,
            "not all spinners spin in the idle class: {:?}",
            spinners()
        );
        drop(guard);
        // Parked ('S') once no guard is held. Other tests in this process may hold guards
        // for a while (a training step), hence the long wait; spinners that never park
        // fail it.
        let parked = within(600, |s| {
            s.len() == threads && s.iter().all(|(_, state, _)| *state == 'S')
        });
        assert!(
            parked,
            "spinners kept spinning with no guard held: {:?}",
            spinners()
        );
    }
}
