// h[j] = silu(Wg[e_j] x) * (Wu[e_j] x) for the k experts a token was routed to, in one pass: each
// lane's inputs are loaded once and used for both projections, and the SwiGLU is applied before
// anything is written. An expert id past the last expert reads the last one (never memory outside
// the weights); bad[0] counts such ids, for the caller to report.
// inputs: x (K), ids (k) uint32, gate_w / up_w (E, I, K*BITS/32), gate_s / gate_b / up_s / up_b (E, I, K/GS)
// outputs: h (k, I), bad (1) uint32
// template: T, BITS, GS, SIMD, SG (simdgroups per threadgroup), ROWS (rows per simdgroup)
// grid: (ceil(I / (SG * ROWS)) * SG * SIMD, k, 1), threadgroup (SG * SIMD, 1, 1)
  const int E = gate_w_shape[0];
  const int I = gate_w_shape[1];
  const int K = gate_w_shape[2] * 32 / BITS;
  const int k_experts = ids_shape[0];
  if (threadgroup_position_in_grid.x == 0 && threadgroup_position_in_grid.y == 0 &&
      thread_index_in_threadgroup == 0) {
    uint n = 0;
    for (int j = 0; j < k_experts; j++) {
      n += ids[j] >= uint(E) ? 1 : 0;
    }
    bad[0] = n;
  }
  const int j = threadgroup_position_in_grid.y;
  const long e = metal::min(ids[j], uint(E - 1));
  const uint lane = thread_index_in_simdgroup;
  const int row0 = (threadgroup_position_in_grid.x * SG + simdgroup_index_in_threadgroup) * ROWS;
  if (row0 >= I) {
    return;  // the whole simdgroup, before any simd_sum: no lane is left waiting
  }
  int rows[ROWS];
  for (int r = 0; r < ROWS; r++) {
    rows[r] = metal::min(row0 + r, I - 1);  // past the end: read the last row, store nothing
  }
  const long wstride = (long)I * (K * BITS / 32);
  const long sstride = (long)I * (K / GS);
  const QMatrix<T> mats[2] = {
      {gate_w + e * wstride, gate_s + e * sstride, gate_b + e * sstride},
      {up_w + e * wstride, up_s + e * sstride, up_b + e * sstride},
  };
  float acc[2 * ROWS];  // gate rows, then up rows
  qrows<T, BITS, GS, SIMD, ROWS, 2>(acc, mats, rows, K, x, lane);
  for (int r = 0; r < ROWS; r++) {
    const float gate = simd_sum(acc[r]);
    const float up = simd_sum(acc[ROWS + r]);
    if (lane == 0 && row0 + r < I) {
      h[(long)j * I + row0 + r] = T(gate / (1.0f + metal::exp(-gate)) * up);
    }
  }
