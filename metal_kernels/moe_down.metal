// y = sum_j score_j * Wd[e_j] h[j]: the k experts' down projections, weighted by the router and
// summed in the same pass (float accumulation, one write per output row).
// inputs: h (k, I), ids (k) uint32, scores (k), w (E, D, I*BITS/32), s / b (E, D, I/GS)
// output: y (D); template: T, BITS, GS, ROWS
// grid: (threadgroups * 64, 1, 1), threadgroup (64, 1, 1)
  const int D = w_shape[1];
  const int I = w_shape[2] * 32 / BITS;
  const int k_experts = ids_shape[0];
  const uint lane = thread_index_in_simdgroup;
  const int row0 = (threadgroup_position_in_grid.x * 2 + simdgroup_index_in_threadgroup) * ROWS;
  if (row0 >= D) {
    return;
  }
  const long wstride = (long)D * (I * BITS / 32);
  const long sstride = (long)D * (I / GS);
  float acc[ROWS];
  for (int r = 0; r < ROWS; r++) {
    acc[r] = 0.0f;
  }
  for (int j = 0; j < k_experts; j++) {
    const long e = ids[j];
    const float score = float(scores[j]);
    const device T* hj = h + (long)j * I;
    for (int k = lane * VPT; k < I; k += SIMD * VPT) {
      float hv[VPT];
      float hsum = load8(hj, k, hv);
      for (int r = 0; r < ROWS; r++) {
        if (row0 + r < D) {
          acc[r] += score * qrow8<T, BITS, GS>(w + e * wstride, s + e * sstride, b + e * sstride,
                                               row0 + r, k, I, hv, hsum);
        }
      }
    }
  }
  for (int r = 0; r < ROWS; r++) {
    float total = simd_sum(acc[r]);
    if (lane == 0 && row0 + r < D) {
      y[row0 + r] = T(total);
    }
  }
