// kfac_kernels: host emulation of the kernels. The kernel bodies of cholesky.cuh and jacobi.cuh
// run here with HostBlock (exec.cuh): every thread block of every launch, one after the other,
// each phase's items in forward or reversed order, on host memory. Shared memory is poisoned
// with NaN before each block, so a read of something no phase wrote shows up in the results.
#include <cstring>
#include <vector>

#include "api.h"
#include "cholesky.cuh"
#include "dispatch.h"
#include "jacobi.cuh"

namespace kk {
namespace {

struct Smem {
  std::vector<double> buf;
  explicit Smem(size_t bytes) : buf((bytes + 7) / 8 + 1) {}
  unsigned char* fresh() {
    std::memset(buf.data(), 0xff, buf.size() * sizeof(double));  // all-ones bytes: NaN
    return reinterpret_cast<unsigned char*>(buf.data());
  }
};

// Loops over the blocks of one launch: (grid x index, matrix) pairs, reversed on request.
template <class F>
void for_blocks(int64_t batch, int grid, bool reverse, F&& f) {
  for (int64_t i = 0; i < batch * grid; ++i) {
    const int64_t j = reverse ? batch * grid - 1 - i : i;
    f(j / grid, int(j % grid));
  }
}

template <class T, class Acc>
struct HostBlockedExec {
  const InverseParams<T>& p;
  int64_t batch;
  bool reverse;
  Smem smem{blocked_smem_bytes<T, Acc>()};
  HostBlock blk{reverse};

  void init(int grid) {
    for_blocks(batch, grid, reverse, [&](int64_t b, int t) { blocked_init_body<T>(blk, b, t, p); });
  }
  void potrf(int k) {
    for_blocks(batch, 1, reverse, [&](int64_t b, int) {
      blocked_potrf_body<T, Acc>(blk, b, k, p, smem.fresh());
    });
  }
  void trsm(int k, int grid) {
    for_blocks(batch, grid, reverse, [&](int64_t b, int t) {
      blocked_trsm_body<T, Acc>(blk, b, k, t, p, smem.fresh());
    });
  }
  void syrk(int k, int grid) {
    for_blocks(batch, grid, reverse, [&](int64_t b, int t) {
      blocked_syrk_body<T, Acc>(blk, b, k, t, p, smem.fresh());
    });
  }
  void trtri(int d, int grid) {
    for_blocks(batch, grid, reverse, [&](int64_t b, int t) {
      blocked_trtri_body<T, Acc>(blk, b, d, t, p, smem.fresh());
    });
  }
  void lauum(int grid) {
    for_blocks(batch, grid, reverse, [&](int64_t b, int t) {
      blocked_lauum_body<T, Acc>(blk, b, t, p, smem.fresh());
    });
  }
};

}  // namespace

void emulate_damped_inverse(const InverseCall& c, bool reverse) {
  check_inverse_call(c);
  if (c.batch == 0) return;
  KK_FLOAT_ACC_SWITCH(c.dtype, c.fp64_accumulate, [&] {
    const InverseParams<T> p = make_inverse_params<T>(c);
    if (c.variant == kVariantSmem) {
      Smem smem(inverse_smem_bytes<T, Acc>(p.n));
      const HostBlock blk{reverse};
      for_blocks(c.batch, 1, reverse, [&](int64_t b, int) {
        inverse_smem_body<T, Acc>(blk, b, p, smem.fresh());
      });
    } else {
      HostBlockedExec<T, Acc> ex{p, c.batch, reverse};
      blocked_sequence(p.n, ex);
    }
  });
}

void emulate_jacobi_eigh(const EighCall& c, bool reverse) {
  check_eigh_call(c);
  if (c.batch == 0) return;
  KK_FLOAT_SWITCH(c.dtype, [&] {
    const EighParams<T> p = make_eigh_params<T>(c);
    Smem smem(JacobiLayout::make<T>(p.n).bytes);
    const HostBlock blk{reverse};
    for_blocks(c.batch, 1, reverse, [&](int64_t b, int) { jacobi_body<T>(blk, b, p, smem.fresh()); });
  });
}

}  // namespace kk
