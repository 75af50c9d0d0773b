// The audit's runtime: callbacks that tests/metal_audit.py inserts into the kernel's LLVM IR (one
// before every load, one at the top of every basic block), and a main loop that runs only chosen
// threadgroups. Test machinery, like metal_shim.h (included before this); not product code.
#pragma once
#include <unordered_map>
#include <utility>

namespace audit {

struct Buffer {
  uintptr_t lo = 0, hi = 0;
  uint64_t loads = 0, issued = 0, coalesced = 0, instances = 0, noncontiguous = 0;
  std::vector<std::pair<uint64_t, uint64_t>> touched;  // this threadgroup's byte ranges
};

struct State {
  std::vector<Buffer> bufs;
  std::vector<uint64_t> blocks;                     // executions per basic block, this threadgroup
  std::vector<std::vector<uint32_t>> nth;           // per fiber, per load site: executions so far
  // (buffer, simdgroup, site, n-th execution) -> the lanes' byte ranges: one SIMD-group request
  std::unordered_map<uint64_t, std::vector<std::pair<uint64_t, uint64_t>>> requests;
  FILE* out = nullptr;
};

inline State& A() {
  static State a;
  return a;
}

inline void merge(std::vector<std::pair<uint64_t, uint64_t>>& v) {
  std::sort(v.begin(), v.end());
  size_t n = 0;
  for (auto& r : v) {
    if (n && r.first <= v[n - 1].second) {
      v[n - 1].second = std::max(v[n - 1].second, r.second);
    } else {
      v[n++] = r;
    }
  }
  v.resize(n);
}

// Write one threadgroup's figures and start the next from zero.
inline void flush(uint3 tg) {
  State& a = A();
  for (auto& [key, ranges] : a.requests) {
    Buffer& b = a.bufs[key >> 56];
    merge(ranges);
    b.instances++;
    b.noncontiguous += ranges.size() > 1;
    for (auto& r : ranges) {
      b.coalesced += r.second - r.first;
      b.touched.push_back(r);
    }
  }
  a.requests.clear();
  std::fprintf(a.out, "tg %u %u %u\nblocks", tg.x, tg.y, tg.z);
  for (size_t i = 0; i < a.blocks.size(); i++) {
    if (a.blocks[i]) std::fprintf(a.out, " %zu:%llu", i, (unsigned long long)a.blocks[i]);
  }
  std::fprintf(a.out, "\n");
  for (size_t i = 0; i < a.bufs.size(); i++) {
    Buffer& b = a.bufs[i];
    merge(b.touched);
    std::fprintf(a.out, "buf %zu %llu %llu %llu %llu %llu", i, (unsigned long long)b.loads,
                 (unsigned long long)b.issued, (unsigned long long)b.coalesced,
                 (unsigned long long)b.instances, (unsigned long long)b.noncontiguous);
    for (auto& r : b.touched) std::fprintf(a.out, " %llu-%llu", (unsigned long long)r.first, (unsigned long long)r.second);
    std::fprintf(a.out, "\n");
    b = Buffer{b.lo, b.hi};
  }
  std::fill(a.blocks.begin(), a.blocks.end(), 0);
  for (auto& v : a.nth) v.clear();
}

}  // namespace audit

extern "C" void __audit_block(int id) {
  auto& blocks = audit::A().blocks;
  if (size_t(id) >= blocks.size()) blocks.resize(id + 1, 0);
  blocks[id]++;
}

// A load of `size` bytes at `p` by the running fiber; only loads inside the device buffers count.
extern "C" void __audit_load(const void* p, int64_t size, int site) {
  audit::State& a = audit::A();
  uintptr_t at = uintptr_t(p);
  size_t i = 0;
  while (i < a.bufs.size() && !(at >= a.bufs[i].lo && at < a.bufs[i].hi)) i++;
  if (i == a.bufs.size() || size <= 0) return;
  exec::State& s = exec::S();
  const exec::Ids& id = s.fibers[s.current].ids;
  auto& nth = a.nth[s.current];
  if (size_t(site) >= nth.size()) nth.resize(site + 1, 0);
  uint64_t n = nth[site]++;
  audit::Buffer& b = a.bufs[i];
  b.loads++;
  b.issued += size;
  uint64_t key = (uint64_t(i) << 56) | (uint64_t(id.simdgroup_index_in_threadgroup) << 48) |
                 (uint64_t(site) << 32) | n;
  a.requests[key].push_back({at - b.lo, at - b.lo + size});
}

namespace audit {

// Run the threadgroups listed in `which` ("x,y,z;x,y,z;..."), writing each one's figures to `path`.
inline void run(void (*body)(const exec::Ids&), uint3 grid, uint3 size, const char* order, unsigned seed,
                void** B, uint64_t* sizes, int n, const char* which, const char* path) {
  State& a = A();
  for (int i = 0; i < n; i++) a.bufs.push_back(Buffer{uintptr_t(B[i]), uintptr_t(B[i]) + sizes[i]});
  a.nth.resize(size.x * size.y * size.z);
  a.out = std::fopen(path, "w");
  exec::State& s = exec::S();
  s.body = body;
  s.order = order;
  s.rng.seed(seed);
  if (grid.x % size.x || grid.y % size.y || grid.z % size.z) exec::fail("the grid is not a whole number of threadgroups");
  uint3 groups = {grid.x / size.x, grid.y / size.y, grid.z / size.z};
  for (const char* p = which; *p;) {
    uint3 tg;
    int used = 0;
    if (std::sscanf(p, "%u,%u,%u%n", &tg.x, &tg.y, &tg.z, &used) != 3) exec::fail("bad threadgroup list");
    exec::run_threadgroup(tg, size, groups);
    flush(tg);
    p += used;
    if (*p == ';') p++;
  }
  std::fclose(a.out);
}

}  // namespace audit
