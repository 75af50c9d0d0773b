// y = W x for one token: a quantized mat-vec for dense layers.
// inputs: x (K), w (N, K*BITS/32) uint32, scales and biases (N, K/GS); output: y (N)
// template: T (activation type), BITS (4 or 8), GS (32, 64, 128), SIMD (lanes per simdgroup),
// SG (simdgroups per threadgroup), ROWS (rows per simdgroup)
// grid: (ceil(N / (SG * ROWS)) * SG * SIMD, 1, 1), threadgroup (SG * SIMD, 1, 1)
  const int N = w_shape[0];
  const int K = w_shape[1] * 32 / BITS;
  const uint lane = thread_index_in_simdgroup;
  const int row0 = (threadgroup_position_in_grid.x * SG + simdgroup_index_in_threadgroup) * ROWS;
  if (row0 >= N) {
    return;  // the whole simdgroup, before any simd_sum: no lane is left waiting
  }
  int rows[ROWS];
  for (int r = 0; r < ROWS; r++) {
    rows[r] = metal::min(row0 + r, N - 1);  // past the end: read the last row, store nothing
  }
  const QMatrix<T> mat = {w, scales, biases};
  float acc[ROWS];
  qrows<T, BITS, GS, SIMD, ROWS, 1>(acc, &mat, rows, K, x, lane);
  for (int r = 0; r < ROWS; r++) {
    const float total = simd_sum(acc[r]);
    if (lane == 0 && row0 + r < N) {
      y[row0 + r] = T(total);
    }
  }
