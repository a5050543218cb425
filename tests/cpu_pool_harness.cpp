// kernels/cpu_pool.h on its own, for ThreadSanitizer: tests/test_cpu_pool.py builds it with
// -fsanitize=thread and runs it once per wait mode (argv[1]: enum WaitMode). Each job's shares read
// what other shares wrote in the previous job (so the pool must order them), the thread count
// changes from job to job, two callers share the pool, and pauses let the threads fall asleep.
#include "cpu_pool.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

// Rounds of next[i] = data[i] + 3 data[(i + 1) % n] (mod 2^64) on the pool; returns whether the
// result matches the same rounds on one thread.
bool rounds(int64_t n, int rounds, int seed) {
    const PoolScope scope;  // as the decode entry points do: jobs go to the pool
    std::vector<uint64_t> data(n), next(n), ref(n), tmp(n);
    for (int64_t i = 0; i < n; ++i) data[i] = ref[i] = uint64_t(i * 7 + seed);
    for (int r = 0; r < rounds; ++r) {
        const int threads = 1 + (r + seed) % 5;
        parallel(true, threads, [&](int64_t share, int64_t shares) {
            for (int64_t i = n * share / shares; i < n * (share + 1) / shares; ++i) next[i] = data[i] + 3 * data[(i + 1) % n];
            parallel(true, 2, [](int64_t, int64_t nested) { (void)nested; });  // runs inline
        });
        std::swap(data, next);
        for (int64_t i = 0; i < n; ++i) tmp[i] = ref[i] + 3 * ref[(i + 1) % n];
        std::swap(ref, tmp);
        if (r % 200 == 199) std::this_thread::sleep_for(std::chrono::milliseconds(3));  // past the yield phase
    }
    return data == ref;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2 || pool_policy(std::atoi(argv[1]), 2000, 200000)) return 2;
    bool other_ok = false;
    std::thread other([&] { other_ok = rounds(97, 1000, 1); });
    const bool ok = rounds(64, 2000, 0);
    other.join();
    std::printf("%s\n", ok && other_ok ? "ok" : "mismatch");
    return ok && other_ok ? 0 : 1;
}
