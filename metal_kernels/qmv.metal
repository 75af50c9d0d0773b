// y = W x for one token: a quantized mat-vec for dense layers.
// inputs: x (K), w (N, K*BITS/32) uint32, scales and biases (N, K/GS); output: y (N)
// template: T (activation type), BITS (4 or 8), GS (32, 64, 128), ROWS (rows per simdgroup)
// grid: (threadgroups * 64, 1, 1), threadgroup (64, 1, 1): two simdgroups of ROWS rows each.
  const int N = w_shape[0];
  const int K = w_shape[1] * 32 / BITS;
  const uint lane = thread_index_in_simdgroup;
  const int row0 = (threadgroup_position_in_grid.x * 2 + simdgroup_index_in_threadgroup) * ROWS;
  if (row0 >= N) {
    return;  // the whole simdgroup: no lane is left waiting in simd_sum
  }
  float acc[ROWS];
  for (int r = 0; r < ROWS; r++) {
    acc[r] = 0.0f;
  }
  for (int k = lane * VPT; k < K; k += SIMD * VPT) {
    float xv[VPT];
    float xsum = load8(x, k, xv);
    for (int r = 0; r < ROWS; r++) {
      if (row0 + r < N) {
        acc[r] += qrow8<T, BITS, GS>(w, scales, biases, row0 + r, k, K, xv, xsum);
      }
    }
  }
  for (int r = 0; r < ROWS; r++) {
    float total = simd_sum(acc[r]);
    if (lane == 0 && row0 + r < N) {
      y[row0 + r] = T(total);
    }
  }
