// h[j] = silu(Wg[e_j] x) * (Wu[e_j] x) for the k experts a token was routed to, in one pass:
// each lane's 8 inputs are loaded once and used for both projections, and the SwiGLU is applied
// before anything is written.
// inputs: x (K), ids (k) uint32, gate_w / up_w (E, I, K*BITS/32), gate_s / gate_b / up_s / up_b (E, I, K/GS)
// output: h (k, I); template: T, BITS, GS, ROWS
// grid: (threadgroups * 64, k, 1), threadgroup (64, 1, 1)
  const int I = gate_w_shape[1];
  const int K = gate_w_shape[2] * 32 / BITS;
  const int j = threadgroup_position_in_grid.y;
  const long e = ids[j];
  const uint lane = thread_index_in_simdgroup;
  const int row0 = (threadgroup_position_in_grid.x * 2 + simdgroup_index_in_threadgroup) * ROWS;
  if (row0 >= I) {
    return;
  }
  const long wstride = (long)I * (K * BITS / 32);
  const long sstride = (long)I * (K / GS);
  const device uint32_t* wg = gate_w + e * wstride;
  const device uint32_t* wu = up_w + e * wstride;
  const device T* sg = gate_s + e * sstride;
  const device T* bg = gate_b + e * sstride;
  const device T* su = up_s + e * sstride;
  const device T* bu = up_b + e * sstride;
  float g[ROWS];
  float u[ROWS];
  for (int r = 0; r < ROWS; r++) {
    g[r] = 0.0f;
    u[r] = 0.0f;
  }
  for (int k = lane * VPT; k < K; k += SIMD * VPT) {
    float xv[VPT];
    float xsum = load8(x, k, xv);
    for (int r = 0; r < ROWS; r++) {
      if (row0 + r < I) {
        g[r] += qrow8<T, BITS, GS>(wg, sg, bg, row0 + r, k, K, xv, xsum);
        u[r] += qrow8<T, BITS, GS>(wu, su, bu, row0 + r, k, K, xv, xsum);
      }
    }
  }
  for (int r = 0; r < ROWS; r++) {
    float gate = simd_sum(g[r]);
    float up = simd_sum(u[r]);
    if (lane == 0 && row0 + r < I) {
      h[(long)j * I + row0 + r] = T(gate / (1.0f + metal::exp(-gate)) * up);
    }
  }
