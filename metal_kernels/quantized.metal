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
// Dequantization without shifts, as MLX's qmv does it: at 4 bits, x is pre-scaled once per step by
// powers of two (input i of each word by 16^-(i % 8)), so a weight costs one AND (its nibble
// masked in place in the 32-bit word) and one convert; at 8 bits a weight costs one convert of its
// byte of the loaded word (as_type<uchar4>). The products
// are exact in float (the masked value is q * 16^i, the pre-scaled x is x * 16^-i) unless
// x * 2^-28 is below float's normal range (|x| < 2^-98), where it flushes.
//
// Loops over constant counts are unrolled in full (as MLX's kernels ask, STEEL_PRAGMA_UNROLL), so
// indices such as i % 8 and the masks are constants in the compiled code.

// One lane's V inputs as float, pre-scaled for qdot; returns their (unscaled) sum for the biases.
template <typename T, int BITS, int V>
inline float load_x(const device T* x, thread float* xs) {
  float sum = 0.0f;
#pragma clang loop unroll(full)
  for (int i = 0; i < V; i++) {
    const float v = float(x[i]);
    sum += v;
    xs[i] = BITS == 4 ? v * (1.0f / float(1u << (4 * (i % 8)))) : v;
  }
  return sum;
}

// x . q over the 8 nibbles of one word (xs pre-scaled by 16^-i): one AND and one convert a weight
inline float dot_nibbles(uint word, const thread float* xs) {
  float acc = 0.0f;
#pragma clang loop unroll(full)
  for (int i = 0; i < 8; i++) {
    acc += xs[i] * float(word & (0xfu << (4 * i)));
  }
  return acc;
}

// x . q over the 4 bytes of one word: one convert a weight (the bytes are the register's, as a
// uchar4 load would hand them over)
inline float dot_bytes(uint word, const thread float* xs) {
  const uchar4 b = as_type<uchar4>(word);
  return xs[0] * float(b.x) + xs[1] * float(b.y) + xs[2] * float(b.z) + xs[3] * float(b.w);
}

// x . q over one lane's V = 16 (whole step) or 8 (tail) inputs, the packed words at w: one vector
// load of the lane's words
template <int BITS, int V>
inline float qdot(const device uint32_t* w, const thread float* xs) {
  if (BITS == 4 && V == 16) {
    const uint2 v = *(const device uint2*)w;
    return dot_nibbles(v.x, xs) + dot_nibbles(v.y, xs + 8);
  }
  if (BITS == 4) {
    return dot_nibbles(w[0], xs);
  }
  if (V == 16) {
    const uint4 v = *(const device uint4*)w;
    return dot_bytes(v.x, xs) + dot_bytes(v.y, xs + 4) + dot_bytes(v.z, xs + 8) + dot_bytes(v.w, xs + 12);
  }
  const uint2 v = *(const device uint2*)w;
  return dot_bytes(v.x, xs) + dot_bytes(v.y, xs + 4);
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
#pragma clang loop unroll(full)
  for (int m = 0; m < M; m++) {
#pragma clang loop unroll(full)
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
