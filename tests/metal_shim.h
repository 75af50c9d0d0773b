// Just enough of the Metal Shading Language for C++ to compile MLX's generated kernel source, and
// a scheduler that runs each threadgroup's threads as cooperative fibers, so that
// threadgroup_barrier and the 32-lane SIMD-group functions keep their real semantics.
// Test machinery (tests/metal_executor.py writes the harness around it); not product code.
#pragma once
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

// ---- address spaces and attributes: meaningless on one CPU ----
#define device
#define constant
#define thread
#define threadgroup  // declarations are rewritten to exec::tg_array (poisoned, shared by the group)

// ---- types ----
typedef uint32_t uint;
typedef uint16_t ushort;
typedef _Float16 half;
typedef _Float16 float16_t;  // MLX's name for half

typedef uint8_t uchar;

struct uint3 {
  uint x, y, z;
};

// Vector types as Metal lays them out: components in order, aligned to their size (so a misaligned
// vector load shows under -fsanitize=alignment), .x .y .z .w and [] access. Under clang they are
// what Metal's own are, clang vectors (so the audit's IR sees vector loads and element moves as
// Metal's compiler does); g++ has no .x on its vectors, so there they are structs.
#ifdef __clang__
typedef uint uint2 __attribute__((ext_vector_type(2)));
typedef uint uint4 __attribute__((ext_vector_type(4)));
typedef ushort ushort2 __attribute__((ext_vector_type(2)));
typedef ushort ushort4 __attribute__((ext_vector_type(4)));
typedef uchar uchar4 __attribute__((ext_vector_type(4)));
#else
template <typename T>
struct alignas(2 * sizeof(T)) vec2 {
  union {
    struct {
      T x, y;
    };
    T c[2];
  };
  T& operator[](int i) { return c[i]; }
  const T& operator[](int i) const { return c[i]; }
};

template <typename T>
struct alignas(4 * sizeof(T)) vec4 {
  union {
    struct {
      T x, y, z, w;
    };
    T c[4];
  };
  T& operator[](int i) { return c[i]; }
  const T& operator[](int i) const { return c[i]; }
};

typedef vec2<uint> uint2;
typedef vec4<uint> uint4;
typedef vec2<ushort> ushort2;
typedef vec4<ushort> ushort4;
typedef vec4<uchar> uchar4;
#endif

// Metal's as_type: the same bits as another type of the same size
template <typename T, typename U>
T as_type(const U& v) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs types of one size");
  T out;
  std::memcpy(&out, &v, sizeof(T));
  return out;
}

struct bfloat16_t {  // stored as the top 16 bits of a float, rounded to nearest even
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = uint16_t((u >> 16) | 0x40u);  // NaN stays NaN
    } else {
      bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

enum class mem_flags { mem_none, mem_device, mem_threadgroup, mem_texture };

namespace metal {
using std::abs;
using std::exp;
using std::log;
using std::max;
using std::min;
using std::sqrt;
using std::tanh;
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
namespace fast {
using std::exp;
using std::log;
}
namespace precise {
using std::exp;
using std::log;
}
}  // namespace metal

// ---- the scheduler ----
namespace exec {

constexpr int kSimd = 32;
constexpr size_t kStack = 256 * 1024;

enum Wait { kRunning, kBarrier, kSimd1, kSimd2, kDone };

struct Ids {
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threads_per_threadgroup, threadgroups_per_grid, threads_per_grid;
  uint thread_index_in_threadgroup, simdgroup_index_in_threadgroup, thread_index_in_simdgroup;
  uint threads_per_simdgroup, simdgroups_per_threadgroup;
};

// A fiber starts on its own stack through swapcontext, once; after that every switch is a
// _setjmp/_longjmp pair, which (unlike swapcontext) makes no system call to save the signal mask.
struct Fiber {
  ucontext_t ctx;
  jmp_buf jb;
  bool started = false;
  std::vector<char> stack;
  Wait wait = kRunning;
  int decls = 0;  // threadgroup declarations met so far
  Ids ids;
};

struct State {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  jmp_buf scheduler_jb;
  int current = 0;
  void (*body)(const Ids&) = nullptr;
  std::vector<unsigned char> arena;  // threadgroup memory, poisoned before each threadgroup
  std::vector<size_t> offsets;       // where the i-th threadgroup declaration lives in the arena
  std::vector<uint64_t> slots;       // one 8-byte slot per lane for SIMD-group exchanges
  std::string order;
  std::mt19937 rng;
};

inline State& S() {
  static State s;
  return s;
}

inline void block(Wait w) {
  State& s = S();
  Fiber& f = s.fibers[s.current];
  f.wait = w;
  if (!_setjmp(f.jb)) _longjmp(s.scheduler_jb, 1);
}

template <typename T, int N>
T (&tg_array())[N] {
  State& s = S();
  int i = s.fibers[s.current].decls++;
  if (i == int(s.offsets.size())) {
    size_t at = s.offsets.empty() ? 0 : s.arena.size();
    at = (at + 15) & ~size_t(15);
    s.offsets.push_back(at);
    s.arena.resize(at + sizeof(T) * N, 0xff);  // 0xff..: NaN as a float, huge as an integer
  }
  return *reinterpret_cast<T(*)[N]>(s.arena.data() + s.offsets[i]);
}

// Every SIMD-group function: each lane leaves its value in its slot, all lanes meet, each reads
// what it needs, all lanes meet again (so no slot is overwritten before everyone has read it).
template <typename T, typename F>
T simd_exchange(T v, F combine) {
  State& s = S();
  int me = s.current;
  int first = me - int(s.fibers[me].ids.thread_index_in_simdgroup);
  static_assert(sizeof(T) <= 8, "SIMD values of at most 8 bytes");
  std::memcpy(&s.slots[me], &v, sizeof(T));
  block(kSimd1);
  int lanes = std::min(kSimd, int(s.fibers.size()) - first);
  T out = combine(first, lanes);
  block(kSimd2);
  return out;
}

template <typename T>
T lane_value(int fiber) {
  T v;
  std::memcpy(&v, &S().slots[fiber], sizeof(T));
  return v;
}

inline void entry() {
  State& s = S();
  s.body(s.fibers[s.current].ids);
  s.fibers[s.current].wait = kDone;
  _longjmp(s.scheduler_jb, 1);
}

[[noreturn]] inline void fail(const char* why) {
  std::fprintf(stderr, "metal executor: %s\n", why);
  std::exit(3);
}

// Release the fibers waiting at a point every live member of their group has reached.
inline bool release() {
  State& s = S();
  int n = int(s.fibers.size());
  bool any = false;
  bool live_left = false;
  for (auto& f : s.fibers) live_left |= f.wait != kDone;
  if (!live_left) return false;
  bool all_barrier = true;
  for (auto& f : s.fibers) all_barrier &= f.wait == kDone || f.wait == kBarrier;
  if (all_barrier) {
    for (auto& f : s.fibers) {
      if (f.wait == kDone) fail("a thread returned while others wait at threadgroup_barrier");
    }
    for (auto& f : s.fibers) f.wait = kRunning;
    return true;
  }
  for (int first = 0; first < n; first += kSimd) {
    int last = std::min(n, first + kSimd);
    for (Wait w : {kSimd1, kSimd2}) {
      bool all = true, some = false;
      for (int i = first; i < last; i++) {
        all &= s.fibers[i].wait == kDone || s.fibers[i].wait == w;
        some |= s.fibers[i].wait == w;
      }
      if (all && some) {
        for (int i = first; i < last; i++)
          if (s.fibers[i].wait == w) s.fibers[i].wait = kRunning;
        any = true;
      }
    }
  }
  if (!any) fail("deadlock: threads wait at different barriers or SIMD-group functions");
  return true;
}

inline std::vector<int> ordered(int n) {
  State& s = S();
  std::vector<int> idx(n);
  for (int i = 0; i < n; i++) idx[i] = i;
  if (s.order == "reverse") std::reverse(idx.begin(), idx.end());
  if (s.order == "random") std::shuffle(idx.begin(), idx.end(), s.rng);
  return idx;
}

inline void run_threadgroup(uint3 tg, uint3 size, uint3 groups) {
  State& s = S();
  int n = int(size.x * size.y * size.z);
  s.fibers.resize(n);
  s.slots.assign(n, 0);
  std::fill(s.arena.begin(), s.arena.end(), 0xff);
  for (int i = 0; i < n; i++) {
    Fiber& f = s.fibers[i];
    f.stack.resize(kStack);
    f.wait = kRunning;
    f.started = false;
    f.decls = 0;
    uint3 local = {uint(i) % size.x, (uint(i) / size.x) % size.y, uint(i) / (size.x * size.y)};
    f.ids.thread_position_in_threadgroup = local;
    f.ids.threadgroup_position_in_grid = tg;
    f.ids.thread_position_in_grid = {tg.x * size.x + local.x, tg.y * size.y + local.y, tg.z * size.z + local.z};
    f.ids.threads_per_threadgroup = size;
    f.ids.threadgroups_per_grid = groups;
    f.ids.threads_per_grid = {groups.x * size.x, groups.y * size.y, groups.z * size.z};
    f.ids.thread_index_in_threadgroup = uint(i);
    f.ids.simdgroup_index_in_threadgroup = uint(i / kSimd);
    f.ids.thread_index_in_simdgroup = uint(i % kSimd);
    f.ids.threads_per_simdgroup = kSimd;
    f.ids.simdgroups_per_threadgroup = uint((n + kSimd - 1) / kSimd);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, entry, 0);
  }
  while (true) {
    bool ran = false;
    for (int i : ordered(n)) {
      if (s.fibers[i].wait != kRunning) continue;
      s.current = i;
      Fiber& f = s.fibers[i];
      if (!_setjmp(s.scheduler_jb)) {
        if (f.started) _longjmp(f.jb, 1);
        f.started = true;
        swapcontext(&s.scheduler, &f.ctx);
      }
      ran = true;
    }
    if (!ran && !release()) break;
  }
}

inline void run_grid(void (*body)(const Ids&), uint3 grid, uint3 size, const char* order, unsigned seed) {
  State& s = S();
  s.body = body;
  s.order = order;
  s.rng.seed(seed);
  if (grid.x % size.x || grid.y % size.y || grid.z % size.z) fail("the grid is not a whole number of threadgroups");
  uint3 groups = {grid.x / size.x, grid.y / size.y, grid.z / size.z};
  int total = int(groups.x * groups.y * groups.z);
  for (int g : ordered(total)) {
    uint3 tg = {uint(g) % groups.x, (uint(g) / groups.x) % groups.y, uint(g) / (groups.x * groups.y)};
    run_threadgroup(tg, size, groups);
  }
}

}  // namespace exec

// ---- the Metal functions the kernels call ----
inline void threadgroup_barrier(mem_flags) { exec::block(exec::kBarrier); }
inline void simdgroup_barrier(mem_flags) {
  exec::simd_exchange(0, [](int, int) { return 0; });
}

template <typename T>
T simd_sum(T v) {
  return exec::simd_exchange(v, [](int first, int lanes) {
    T acc = T(0);
    for (int l = 0; l < lanes; l++)
      if (exec::S().fibers[first + l].wait != exec::kDone) acc += exec::lane_value<T>(first + l);
    return acc;
  });
}

template <typename T>
T simd_max(T v) {
  return exec::simd_exchange(v, [](int first, int lanes) {
    T acc = exec::lane_value<T>(first);
    for (int l = 1; l < lanes; l++)
      if (exec::S().fibers[first + l].wait != exec::kDone) acc = std::max(acc, exec::lane_value<T>(first + l));
    return acc;
  });
}

template <typename T>
T simd_shuffle_down(T v, ushort delta) {
  int me = exec::S().current;
  return exec::simd_exchange(v, [me, delta](int first, int lanes) {
    int lane = me - first + delta;
    return exec::lane_value<T>(first + (lane < lanes ? lane : me - first));
  });
}

template <typename T>
T simd_broadcast(T v, ushort lane) {
  return exec::simd_exchange(v, [lane](int first, int) { return exec::lane_value<T>(first + lane); });
}
