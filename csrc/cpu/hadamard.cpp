// The online Walsh-Hadamard rotation of one row, in fp32: RotatedLinear's transform (models/rotated_linear.py), used
// by the decode layer (decode_layer.cpp) and by the CPU kernel of pqk::hadamard_transform (torch_ops.cpp).
#include <math.h>
#include <stdint.h>

#include "kernels.h"

namespace pqk {
namespace cpu {

// x [n] <- (H_m (x) H_{2^p}) x / sqrt(n), n = m 2^p: hadamard.py's transform. x viewed [m, 2^p]: radix-2 butterflies
// along each row (stage j pairs the elements whose index differs in bit j), then each column mixed by H_m, summed
// in k order (hadamard.py's "sequential" form), then the scale.
void hadamard(float* x, int64_t n, const float* hm, int64_t m, float* tmp) {
  const int64_t P = n / m;
  for (int64_t r = 0; r < m; ++r) {
    float* v = x + r * P;
    for (int64_t h = 1; h < P; h <<= 1)
      for (int64_t i = 0; i < P; i += 2 * h)
        for (int64_t j = i; j < i + h; ++j) {
          const float u = v[j], w = v[j + h];
          v[j] = u + w;
          v[j + h] = u - w;
        }
  }
  if (m > 1) {
    for (int64_t i = 0; i < n; ++i) tmp[i] = 0.0f;
    for (int64_t a = 0; a < m; ++a)
      for (int64_t k = 0; k < m; ++k) {
        const float c = hm[a * m + k];
        for (int64_t b = 0; b < P; ++b) tmp[a * P + b] += c * x[k * P + b];
      }
    for (int64_t i = 0; i < n; ++i) x[i] = tmp[i];
  }
  const float s = (float)(1.0 / sqrt((double)n));
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

}  // namespace cpu
}  // namespace pqk
