// Shared by the kernels below (passed to mx.fast.metal_kernel as `header`).
//
// MLX's affine layout: each row of a weight is packed along the input dimension into uint32 words,
// 32 / BITS values per word, the first value in the lowest bits; every GS consecutive inputs share
// one scale and one bias (w = scale * q + bias).
//
// A lane takes 16 consecutive inputs per step with one vector load of its weights (a uint2 at
// 4 bits, a uint4 at 8), so a simdgroup covers SIMD * 16 inputs per step; what is left of the
// input dimension after the last whole step (K = 768: 256) is taken 8 inputs per lane (one word at
// 4 bits, a uint2 at 8) by the lanes that still have inputs.
//
// Precondition (checked by the Python dispatcher): every weight buffer's base address is 16-byte
// aligned. With K % 32 == 0 a row is a multiple of 16 bytes and a lane's offset within a step is
// 8 (4-bit) or 16 (8-bit) bytes times its lane index, so every vector load is aligned. x, scales
// and biases may start anywhere: they are read one element at a time.
//
// Dequantization without shifts: x is pre-scaled once per step by powers of two (at 4 bits, input
// i of each 16-bit half-word by 16^-(i % 4)), so a 4-bit weight costs one AND (its nibble masked in
// place) and one convert, and an 8-bit weight one convert of its byte. The products are exact in
// float (the masked value is q * 16^j, the pre-scaled x is x * 16^-j) unless x * 2^-12 is below
// float's normal range (|x| < 2^-114), where it flushes, as MLX's own qmv does.

// One lane's V inputs as float, pre-scaled for qdot; returns their (unscaled) sum for the biases.
template <typename T, int BITS, int V>
inline float load_x(const device T* x, thread float* xs) {
  float sum = 0.0f;
  for (int i = 0; i < V; i++) {
    const float v = float(x[i]);
    sum += v;
    xs[i] = BITS == 4 ? v * (1.0f / float(1 << (4 * (i % 4)))) : v;
  }
  return sum;
}

// x . q over the 4 nibbles of one 16-bit half-word (xs pre-scaled by 1, 1/16, 1/256, 1/4096)
inline float dot_nibbles(ushort h, const thread float* xs) {
  return xs[0] * float(h & 0x000f) + xs[1] * float(h & 0x00f0) + xs[2] * float(h & 0x0f00) +
         xs[3] * float(h & 0xf000);
}

// x . q over the 4 bytes of one word
inline float dot_bytes(uint word, const thread float* xs) {
  const uchar4 b = as_type<uchar4>(word);
  return xs[0] * float(b.x) + xs[1] * float(b.y) + xs[2] * float(b.z) + xs[3] * float(b.w);
}

// x . q over one lane's V = 16 (vector load) or 8 (tail) inputs, the packed words at w
template <int BITS, int V>
inline float qdot(const device uint32_t* w, const thread float* xs) {
  float acc = 0.0f;
  if (BITS == 4 && V == 16) {
    const ushort4 h = as_type<ushort4>(*(const device uint2*)w);
    for (int i = 0; i < 4; i++) {
      acc += dot_nibbles(h[i], xs + 4 * i);
    }
  } else if (BITS == 4) {
    const ushort2 h = as_type<ushort2>(w[0]);
    acc = dot_nibbles(h.x, xs) + dot_nibbles(h.y, xs + 4);
  } else if (V == 16) {
    const uint4 v = *(const device uint4*)w;
    for (int i = 0; i < 4; i++) {
      acc += dot_bytes(v[i], xs + 4 * i);
    }
  } else {
    const uint2 v = *(const device uint2*)w;
    acc = dot_bytes(v.x, xs) + dot_bytes(v.y, xs + 4);
  }
  return acc;
}

// One quantized matrix: packed words, scales, biases (rows of K inputs).
template <typename T>
struct QMatrix {
  const device uint32_t* w;
  const device T* scales;
  const device T* biases;
};

// One step of one lane: acc[m * R + r] += scale * (x . q) + bias * sum(x) over its V inputs
// starting at k, for rows rows[r] of each of the M matrices.
template <typename T, int BITS, int GS, int V, int R, int M>
inline void qstep(thread float* acc, const thread QMatrix<T>* mats, const thread int* rows, int K,
                  const device T* x, int k) {
  float xs[V];
  const float xsum = load_x<T, BITS, V>(x + k, xs);
  for (int m = 0; m < M; m++) {
    for (int r = 0; r < R; r++) {
      const long row = rows[r];
      const device uint32_t* w = mats[m].w + row * (K * BITS / 32) + k * BITS / 32;
      const long g = row * (K / GS) + k / GS;
      acc[m * R + r] += float(mats[m].scales[g]) * qdot<BITS, V>(w, xs) + float(mats[m].biases[g]) * xsum;
    }
  }
}

// One lane's share of rows rows[0..R) of M matrices times x (K inputs): the whole steps 16 inputs
// a lane, then the tail 8 inputs a lane. The rows must be in range (callers clamp them), so every
// load is unconditional; simd_sum of acc over the simdgroup gives the dot products.
template <typename T, int BITS, int GS, int SIMD, int R, int M>
inline void qrows(thread float* acc, const thread QMatrix<T>* mats, const thread int* rows, int K,
                  const device T* x, uint lane) {
  for (int i = 0; i < M * R; i++) {
    acc[i] = 0.0f;
  }
  const int whole = K / (SIMD * 16) * (SIMD * 16);
  for (int k = lane * 16; k < whole; k += SIMD * 16) {
    qstep<T, BITS, GS, 16, R, M>(acc, mats, rows, K, x, k);
  }
  for (int k = whole + lane * 8; k < K; k += SIMD * 8) {
    qstep<T, BITS, GS, 8, R, M>(acc, mats, rows, K, x, k);
  }
}
