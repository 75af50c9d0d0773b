// y = sum_j score_j * Wd[e_j] h[j]: the k experts' down projections, weighted by the router and
// summed. A threadgroup owns R output rows and has one simdgroup per selected expert: simdgroup j
// computes expert j's R dot products over I, scales them by scores[j] once, and leaves them in
// threadgroup memory; after one barrier, R threads add the k partial sums in expert order (the
// same bits whatever order the threads ran in) and store. An expert id past the last expert reads
// the last one (moe_gate_up counts them).
// inputs: h (k, I), ids (k) uint32, scores (k), w (E, D, I*BITS/32), s / b (E, D, I/GS)
// output: y (D)
// template: T, BITS, GS, SIMD (lanes per simdgroup), KE (k, the simdgroups per threadgroup), R
// grid: (ceil(D / R) * KE * SIMD, 1, 1), threadgroup (KE * SIMD, 1, 1)
  threadgroup float partial[KE * R];  // partial[j * R + r]: expert j's share of row row0 + r
  const int E = w_shape[0];
  const int D = w_shape[1];
  const int I = w_shape[2] * 32 / BITS;
  const uint lane = thread_index_in_simdgroup;
  const int j = simdgroup_index_in_threadgroup;
  const int row0 = threadgroup_position_in_grid.x * R;  // < D: the grid has no idle threadgroup
  const long e = metal::min(ids[j], uint(E - 1));
  int rows[R];
  for (int r = 0; r < R; r++) {
    rows[r] = metal::min(row0 + r, D - 1);  // past the end: read the last row, store nothing
  }
  const long wstride = (long)D * (I * BITS / 32);
  const long sstride = (long)D * (I / GS);
  const QMatrix<T> mat = {w + e * wstride, s + e * sstride, b + e * sstride};
  float acc[R];
  qrows<T, BITS, GS, SIMD, R, 1>(acc, &mat, rows, I, h + (long)j * I, lane);
  const float score = float(scores[j]);
  for (int r = 0; r < R; r++) {
    const float total = simd_sum(acc[r]);
    if (lane == 0) {
      partial[j * R + r] = score * total;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);  // every thread gets here: no early return above
  const uint t = thread_index_in_threadgroup;
  if (t < uint(R) && row0 + int(t) < D) {
    float sum = 0.0f;
    for (int i = 0; i < KE; i++) {
      sum += partial[i * R + t];
    }
    y[row0 + t] = T(sum);
  }
