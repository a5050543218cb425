// The CPU kernels' own thread pool: `parallel(worth_it, threads, body)` runs body(share, shares)
// for every share of a static split, on the caller's thread and on up to threads - 1 pool threads
// inside a decode entry point (PoolScope, below), and as an OpenMP region elsewhere.
// (Pasted before cpu_rwkv7.cpp into the kernels' translation unit; tests/cpu_pool_harness.cpp
// runs it alone under ThreadSanitizer.)
//
// Why not OpenMP: our kernels shared libgomp with torch, whose wait policy is fixed when torch
// loads. Its default spins for milliseconds after each of a decoded token's ~85 regions, so next
// to a busy process two threads fight it for the cores (0.1B decode on 2 cores: 65 -> 20 tok/s);
// OMP_WAIT_POLICY=PASSIVE costs an idle machine 26%, because a sleeping thread takes ~50 us to
// wake on this VM and a token passes ~85 regions.
//
// Here a waiting thread spins for a few microseconds (the gap between two regions of one token),
// then calls sched_yield() for up to a couple of milliseconds (a neighbour that wants the core gets
// it; with none the thread keeps polling, so the gap between two tokens costs no wake-up), then
// sleeps on a futex: between calls the pool threads use no CPU. And a share is claimed by whichever
// thread comes first, the caller included: a pool thread that is asleep or lost its core to
// another process leaves the shares it has not claimed to the caller instead of holding them up
// (a share it claimed still holds up the job until it is done). The shares are the
// same whoever runs them, so results do not depend on the thread count or on who ran what.
//
// The policy (pool_policy, set once by rwkvkit/native/cpu.py from the environment): the pool, unless
// libgomp's threads spin (then one of them would take the core a pool thread needs: idle bf16
// decode lost 10-20%; rwkvkit/omp_wait.py makes them sleep at once where it can) or
// RWKVKIT_CPU_POOL=omp; with the pool, OMP_WAIT_POLICY=ACTIVE spins only, =PASSIVE sleeps at once
// (polling with sched_yield spins too on an idle core).
//
// One job runs at a time (callers from other threads wait their turn); a body never calls parallel
// itself (it would run inline). The pool grows to the largest thread count asked; a pool thread
// not needed for a job is not woken. After fork() the child starts a new pool (pthread_atfork). Pool
// threads are detached, block all signals and never keep the process from exiting.
#ifndef RWKVKIT_CPU_POOL_H
#define RWKVKIT_CPU_POOL_H

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdint>
#include <ctime>
#include <immintrin.h>
#include <linux/futex.h>
#include <memory>
#include <mutex>
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <thread>
#include <unistd.h>
#include <vector>

namespace {

enum WaitMode : int32_t { SPIN_YIELD_SLEEP = 0, ACTIVE = 1, PASSIVE = 2, OPENMP = 3 };  // as rwkvkit/native/cpu.py

struct WaitPolicy {
    int32_t mode = SPIN_YIELD_SLEEP;
    int64_t spin_ns = 5000, yield_ns = 2000000;
};

WaitPolicy g_policy;  // set before the first job (pool_policy)

constexpr int64_t kMaxThreads = 1024;  // a share index fits the job word's 16 bits

inline int64_t now_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

inline void futex_wait(std::atomic<uint32_t>* word, uint32_t value) {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, value, nullptr, nullptr, 0);
}

inline void futex_wake(std::atomic<uint32_t>* word) {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
}

// A word one thread waits on for a change, and whether that thread sleeps (so that the writer
// makes a futex call only then). `asleep` and `word` are seq_cst on both sides: either the writer
// sees the sleeper, or the sleeper's futex sees the new value.
struct alignas(64) Signal {
    std::atomic<uint32_t> word{0};
    std::atomic<uint32_t> asleep{0};

    void set(uint32_t value) {
        word.store(value);
        if (asleep.load()) futex_wake(&word);
    }

    // Returns word once it differs from `old`.
    uint32_t wait_change(uint32_t old, const WaitPolicy& p) {
        uint32_t now = word.load(std::memory_order_acquire);
        if (now != old) return now;
        if (p.mode != PASSIVE) {
            const int64_t start = now_ns();
            for (int64_t i = 1;; ++i) {
                _mm_pause();
                if ((now = word.load(std::memory_order_acquire)) != old) return now;
                if (p.mode != ACTIVE && i % 64 == 0 && now_ns() - start > p.spin_ns) break;
            }
            while (now_ns() - start < p.spin_ns + p.yield_ns) {
                sched_yield();
                if ((now = word.load(std::memory_order_acquire)) != old) return now;
            }
        }
        while ((now = word.load(std::memory_order_acquire)) == old) {
            asleep.store(1);
            if (word.load() == old) futex_wait(&word, old);
            asleep.store(0, std::memory_order_relaxed);
        }
        return now;
    }
};

thread_local bool t_in_job = false;  // inside a body: a nested parallel runs inline

// Jobs go to the pool only inside a decode entry point (decode_layers, and project / lora on
// decoded rows), where every op of a step is ours. Elsewhere (prefill, and decode batches past the
// row kernels) our ops sit between torch's oneDNN GEMMs, whose libgomp threads keep spinning for
// milliseconds after each GEMM: a pool thread would then share a core with one of them and leave
// its shares to the caller (measured: one thread's worth of our prefill work got done), while an
// OpenMP region reuses those very threads, as before the pool.
thread_local bool t_pool_scope = false;

struct PoolScope {  // marks a decode entry point for its duration
    const bool outer = t_pool_scope;
    PoolScope() { t_pool_scope = true; }
    ~PoolScope() { t_pool_scope = outer; }
    PoolScope(const PoolScope&) = delete;
    PoolScope& operator=(const PoolScope&) = delete;
};

class Pool {
   public:
    // Runs body(share, shares) for every share, on up to `threads` threads (this one included).
    void run(int64_t threads, void (*call)(const void*, int64_t, int64_t), const void* body) {
        std::lock_guard<std::mutex> hold(lock_);
        const int64_t shares = std::min(threads, 1 + grow(threads - 1));
        if (shares <= 1) return call(body, 0, 1);
        call_ = call;
        body_ = body;
        done_.word.store(0, std::memory_order_relaxed);
        ++job_;
        ticket_.store(uint64_t(job_) << 32 | uint64_t(shares) << 16, std::memory_order_release);
        for (int64_t i = 0; i + 1 < shares; ++i) workers_[i]->set(job_);
        work(job_);
        for (uint32_t d = done_.word.load(std::memory_order_acquire); d != shares;) d = done_.wait_change(d, g_policy);
    }

   private:
    // Claims and runs shares of job `job` until none is left (or that job is over).
    void work(uint32_t job) {
        uint64_t t = ticket_.load(std::memory_order_acquire);
        for (;;) {
            const int64_t share = t & 0xffff, shares = (t >> 16) & 0xffff;
            if (uint32_t(t >> 32) != job || share >= shares) return;
            if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
            t_in_job = true;
            call_(body_, share, shares);  // call_/body_ stay this job's until done_ reaches shares
            t_in_job = false;
            if (done_.word.fetch_add(1) + 1 == shares && done_.asleep.load()) futex_wake(&done_.word);  // seq_cst: see Signal
            t = ticket_.load(std::memory_order_acquire);
        }
    }

    // Starts pool threads until there are `n` (fewer if the system refuses more); returns how many there are.
    int64_t grow(int64_t n) {
        n = std::min(n, kMaxThreads - 1);
        if (int64_t(workers_.size()) >= n) return int64_t(workers_.size());
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);  // inherited: signals go to the process's own threads
        try {
            while (int64_t(workers_.size()) < n) {
                auto signal = std::make_unique<Signal>();
                std::thread([this, s = signal.get()] { serve(s); }).detach();
                workers_.push_back(std::move(signal));
            }
        } catch (const std::system_error&) {  // no more threads: run with those there are
        }
        pthread_sigmask(SIG_SETMASK, &old, nullptr);
        return int64_t(workers_.size());
    }

    [[noreturn]] void serve(Signal* s) {
        pthread_setname_np(pthread_self(), "rwkvkit-pool");
        for (uint32_t seen = 0;;) work(seen = s->wait_change(seen, g_policy));
    }

    std::mutex lock_;
    std::vector<std::unique_ptr<Signal>> workers_;  // the caller's only; a pool thread holds its own Signal
    uint32_t job_ = 0;
    void (*call_)(const void*, int64_t, int64_t) = nullptr;
    const void* body_ = nullptr;
    alignas(64) std::atomic<uint64_t> ticket_{0};  // job << 32 | shares << 16 | next share
    Signal done_;                                  // shares finished
};

// This process's pool, made on first use. Pools are never destroyed (their threads are detached
// and never stop); fork() leaves the child one whose threads do not exist, so the child drops it.
std::atomic<Pool*> g_pool{nullptr};
const int g_pool_forget_on_fork = pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr, std::memory_order_relaxed); });

Pool& pool() {
    Pool* p = g_pool.load(std::memory_order_acquire);
    if (p != nullptr) return *p;
    auto fresh = std::make_unique<Pool>();
    if (g_pool.compare_exchange_strong(p, fresh.get(), std::memory_order_acq_rel)) return *fresh.release();
    return *p;  // another thread made it first
}

// Run `body(share, shares)` on `threads` threads, or inline on the caller's thread (one share) when
// there is too little work to pay for waking the others.
template <class Body>
void parallel(bool worth_it, int threads, Body body) {
    if (!worth_it || threads <= 1 || t_in_job) return body(0, 1);
    if (g_policy.mode == OPENMP || !t_pool_scope) {
#pragma omp parallel num_threads(threads)
        body(omp_get_thread_num(), omp_get_num_threads());
        return;
    }
    pool().run(threads, [](const void* b, int64_t share, int64_t shares) { (*static_cast<const Body*>(b))(share, shares); }, &body);
}

// body(i) for i in [0, n), in `threads` contiguous shares.
template <class Body>
void parallel_for(int64_t n, int threads, Body body) {
    parallel(n > 1, threads, [&](int64_t share, int64_t shares) {
        for (int64_t i = n * share / shares; i < n * (share + 1) / shares; ++i) body(i);
    });
}

}  // namespace

extern "C" {

// Sets the wait policy (see the top of this file). Returns 0, or 1 (nothing changed) for an
// unknown mode, negative times, or another policy than a running pool's (its threads read it unlocked).
int pool_policy(int32_t mode, int64_t spin_ns, int64_t yield_ns) {
    if (mode < SPIN_YIELD_SLEEP || mode > OPENMP || spin_ns < 0 || yield_ns < 0) return 1;
    if (g_pool.load() != nullptr) return mode != g_policy.mode || spin_ns != g_policy.spin_ns || yield_ns != g_policy.yield_ns;
    g_policy = {mode, spin_ns, yield_ns};
    return 0;
}

}  // extern "C"

#endif  // RWKVKIT_CPU_POOL_H
