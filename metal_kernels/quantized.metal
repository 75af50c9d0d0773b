// Shared by the kernels below (passed to mx.fast.metal_kernel as `header`).
//
// MLX's affine layout: each row of a weight is packed along the input dimension into uint32 words,
// 32 / BITS values per word, the first value in the lowest bits; every GS consecutive inputs share
// one scale and one bias (w = scale * q + bias). A lane takes VPT = 8 consecutive inputs at a time
// (one word at 4 bits, two at 8), so a simdgroup covers 256 inputs per step and any input
// dimension that is a multiple of the group size works: no 512-multiple fast path to fall off.

static constant constexpr const int VPT = 8;   // inputs per lane per step
static constant constexpr const int SIMD = 32;  // lanes per simdgroup

// sum_i x[i] * q[i] over one lane's 8 inputs (q unpacked from the packed words at w)
template <int BITS>
inline float qdot8(const device uint32_t* w, const thread float* x) {
  float acc = 0.0f;
  if (BITS == 4) {
    uint32_t word = w[0];
    for (int i = 0; i < 8; i++) {
      acc += x[i] * float((word >> (4 * i)) & 0xfu);
    }
  } else {
    uint32_t w0 = w[0];
    uint32_t w1 = w[1];
    for (int i = 0; i < 4; i++) {
      acc += x[i] * float((w0 >> (8 * i)) & 0xffu);
      acc += x[4 + i] * float((w1 >> (8 * i)) & 0xffu);
    }
  }
  return acc;
}

// One lane's share of row `row` of a quantized matrix times x: scale * (x . q) + bias * sum(x)
template <typename T, int BITS, int GS>
inline float qrow8(
    const device uint32_t* w, const device T* scales, const device T* biases,
    int row, int k, int K, const thread float* x, float xsum) {
  const int groups = K / GS;
  const device uint32_t* wr = w + (long)row * (K * BITS / 32) + k * BITS / 32;
  float s = float(scales[(long)row * groups + k / GS]);
  float b = float(biases[(long)row * groups + k / GS]);
  return s * qdot8<BITS>(wr, x) + b * xsum;
}

// Load one lane's 8 inputs as float; returns their sum (for the biases).
template <typename T>
inline float load8(const device T* x, int k, thread float* out) {
  float sum = 0.0f;
  for (int i = 0; i < VPT; i++) {
    out[i] = float(x[k + i]);
    sum += out[i];
  }
  return sum;
}
