// kfac_kernels._C: pybind11 bindings of csrc/. Only integers cross this boundary (device
// pointers, element strides, sizes, dtype codes, the device index and the CUDA stream), so the
// module neither links against nor depends on torch: one build serves every torch version.
// Every argument is checked in csrc/check.cpp before any device is touched; a bad argument
// raises ValueError naming it, a CUDA failure raises RuntimeError.
#include <pybind11/pybind11.h>

#include <string>

#include "../csrc/api.h"

namespace py = pybind11;

namespace {

kk::InverseCall inverse_call(int64_t F, int64_t f_stride_b, int64_t f_stride_r, int64_t out,
                             int64_t work, int64_t info, int64_t gamma, int64_t gamma_stride,
                             double gamma_scalar, int64_t batch, int64_t n, int64_t dtype,
                             int64_t variant, bool fp64_accumulate, int64_t device,
                             int64_t stream) {
  kk::InverseCall c;
  c.F = F;
  c.f_stride_b = f_stride_b;
  c.f_stride_r = f_stride_r;
  c.out = out;
  c.work = work;
  c.info = info;
  c.gamma = gamma;
  c.gamma_stride = gamma_stride;
  c.gamma_scalar = gamma_scalar;
  c.batch = batch;
  c.n = n;
  c.dtype = dtype;
  c.variant = variant;
  c.fp64_accumulate = fp64_accumulate;
  c.device = device;
  c.stream = stream;
  return c;
}

kk::EighCall eigh_call(int64_t F, int64_t f_stride_b, int64_t f_stride_r, int64_t Q0,
                       int64_t q_stride_b, int64_t q_stride_r, int64_t evals, int64_t evecs,
                       int64_t info, int64_t sweeps, int64_t batch, int64_t n, int64_t dtype,
                       double tol, int64_t max_sweeps, int64_t device, int64_t stream) {
  kk::EighCall c;
  c.F = F;
  c.f_stride_b = f_stride_b;
  c.f_stride_r = f_stride_r;
  c.Q0 = Q0;
  c.q_stride_b = q_stride_b;
  c.q_stride_r = q_stride_r;
  c.evals = evals;
  c.evecs = evecs;
  c.info = info;
  c.sweeps = sweeps;
  c.batch = batch;
  c.n = n;
  c.dtype = dtype;
  c.tol = tol;
  c.max_sweeps = max_sweeps;
  c.device = device;
  c.stream = stream;
  return c;
}

const char* kInverseDoc = R"doc(
Batched (F_b + gamma_b I)^-1 by Cholesky, asynchronous on `stream` of `device`.

F: address of [batch] x n x n (row stride f_stride_r >= n, batch stride f_stride_b: 0 repeats one
matrix, else no overlap; unit column stride; the lower triangle is read). out, work: contiguous
[batch, n, n] (work only for variant=1, blocked). info: int32 [batch]: 0 ok, k > 0 the leading k x k
minor is not positive definite (that inverse is NaN). gamma: address of per-matrix damping
(stride 0 or 1) or 0 to use gamma_scalar. dtype: 0 float32, 1 float64. variant: 0 one block per
matrix in shared memory, 1 tiled. fp64_accumulate: fp64 dot products for float32 input.
)doc";

const char* kEighDoc = R"doc(
Batched Jacobi eigendecomposition, asynchronous on `stream` of `device`; one block per matrix.

F (and optional warm start Q0, 0 for none): [batch] x n x n with row/batch strides as for
damped_inverse. evals: [batch, n] ascending; evecs: [batch, n, n], eigenvectors in columns. info:
int32 [batch]: 0 converged, 1 not converged within max_sweeps, 2 non-finite input (failed
matrices are NaN). sweeps: int32 [batch] or 0. A pair (p, q) is rotated while
|a_pq| > max(tol sqrt(|a_pp a_qq|), eps ||A||_F).
)doc";

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kfac_kernels CUDA kernels (raw pointers in, no torch dependency)";
  m.attr("FLOAT32") = int(kk::kFloat32);
  m.attr("FLOAT64") = int(kk::kFloat64);
  m.attr("VARIANT_SMEM") = int(kk::kVariantSmem);
  m.attr("VARIANT_BLOCKED") = int(kk::kVariantBlocked);
  m.attr("JACOBI_OK") = 0;
  m.attr("JACOBI_NOT_CONVERGED") = 1;
  m.attr("JACOBI_NON_FINITE") = 2;

  m.def(
      "damped_inverse",
      [](int64_t F, int64_t f_stride_b, int64_t f_stride_r, int64_t out, int64_t work,
         int64_t info, int64_t gamma, int64_t gamma_stride, double gamma_scalar, int64_t batch,
         int64_t n, int64_t dtype, int64_t variant, bool fp64_accumulate, int64_t device,
         int64_t stream) {
        kk::launch_damped_inverse(inverse_call(F, f_stride_b, f_stride_r, out, work, info, gamma,
                                               gamma_stride, gamma_scalar, batch, n, dtype,
                                               variant, fp64_accumulate, device, stream));
      },
      py::kw_only(), py::arg("F"), py::arg("f_stride_b"), py::arg("f_stride_r"), py::arg("out"),
      py::arg("work"), py::arg("info"), py::arg("gamma"), py::arg("gamma_stride"),
      py::arg("gamma_scalar"), py::arg("batch"), py::arg("n"), py::arg("dtype"),
      py::arg("variant"), py::arg("fp64_accumulate") = true, py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(), kInverseDoc);

  m.def(
      "emulate_damped_inverse",
      [](int64_t F, int64_t f_stride_b, int64_t f_stride_r, int64_t out, int64_t work,
         int64_t info, int64_t gamma, int64_t gamma_stride, double gamma_scalar, int64_t batch,
         int64_t n, int64_t dtype, int64_t variant, bool fp64_accumulate, bool reverse) {
        kk::emulate_damped_inverse(inverse_call(F, f_stride_b, f_stride_r, out, work, info, gamma,
                                                gamma_stride, gamma_scalar, batch, n, dtype,
                                                variant, fp64_accumulate, 0, 0),
                                   reverse);
      },
      py::kw_only(), py::arg("F"), py::arg("f_stride_b"), py::arg("f_stride_r"), py::arg("out"),
      py::arg("work"), py::arg("info"), py::arg("gamma"), py::arg("gamma_stride"),
      py::arg("gamma_scalar"), py::arg("batch"), py::arg("n"), py::arg("dtype"),
      py::arg("variant"), py::arg("fp64_accumulate") = true, py::arg("reverse") = false,
      py::call_guard<py::gil_scoped_release>(),
      "damped_inverse's kernels run on the CPU over HOST addresses (verification without a GPU; "
      "reverse=True runs every phase's work items last to first).");

  m.def(
      "jacobi_eigh",
      [](int64_t F, int64_t f_stride_b, int64_t f_stride_r, int64_t Q0, int64_t q_stride_b,
         int64_t q_stride_r, int64_t evals, int64_t evecs, int64_t info, int64_t sweeps,
         int64_t batch, int64_t n, int64_t dtype, double tol, int64_t max_sweeps, int64_t device,
         int64_t stream) {
        kk::launch_jacobi_eigh(eigh_call(F, f_stride_b, f_stride_r, Q0, q_stride_b, q_stride_r,
                                         evals, evecs, info, sweeps, batch, n, dtype, tol,
                                         max_sweeps, device, stream));
      },
      py::kw_only(), py::arg("F"), py::arg("f_stride_b"), py::arg("f_stride_r"), py::arg("Q0"),
      py::arg("q_stride_b"), py::arg("q_stride_r"), py::arg("evals"), py::arg("evecs"),
      py::arg("info"), py::arg("sweeps"), py::arg("batch"), py::arg("n"), py::arg("dtype"),
      py::arg("tol"), py::arg("max_sweeps"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(), kEighDoc);

  m.def(
      "emulate_jacobi_eigh",
      [](int64_t F, int64_t f_stride_b, int64_t f_stride_r, int64_t Q0, int64_t q_stride_b,
         int64_t q_stride_r, int64_t evals, int64_t evecs, int64_t info, int64_t sweeps,
         int64_t batch, int64_t n, int64_t dtype, double tol, int64_t max_sweeps, bool reverse) {
        kk::emulate_jacobi_eigh(eigh_call(F, f_stride_b, f_stride_r, Q0, q_stride_b, q_stride_r,
                                          evals, evecs, info, sweeps, batch, n, dtype, tol,
                                          max_sweeps, 0, 0),
                                reverse);
      },
      py::kw_only(), py::arg("F"), py::arg("f_stride_b"), py::arg("f_stride_r"), py::arg("Q0"),
      py::arg("q_stride_b"), py::arg("q_stride_r"), py::arg("evals"), py::arg("evecs"),
      py::arg("info"), py::arg("sweeps"), py::arg("batch"), py::arg("n"), py::arg("dtype"),
      py::arg("tol"), py::arg("max_sweeps"), py::arg("reverse") = false,
      py::call_guard<py::gil_scoped_release>(),
      "jacobi_eigh's kernel run on the CPU over HOST addresses (see emulate_damped_inverse).");

  m.def("smem_bytes_inverse", &kk::smem_bytes_inverse, py::arg("dtype"),
        py::arg("fp64_accumulate"), py::arg("n"), py::arg("variant"),
        "Shared memory per block of damped_inverse's kernels (no device needed).");
  m.def("smem_bytes_jacobi", &kk::smem_bytes_jacobi, py::arg("dtype"), py::arg("n"),
        "Shared memory per block of jacobi_eigh's kernel (no device needed).");
  m.def("device_smem_per_block_optin", &kk::device_smem_per_block_optin, py::arg("device"),
        "Opt-in shared memory per block of a device (queries it: initialises CUDA).");
  m.def("max_n_inverse_smem", &kk::max_n_inverse_smem, py::arg("dtype"),
        py::arg("fp64_accumulate"), py::arg("device"),
        "Largest n damped_inverse's one-block-per-matrix variant takes on a device.");
  m.def("max_n_jacobi", &kk::max_n_jacobi, py::arg("dtype"), py::arg("device"),
        "Largest n jacobi_eigh takes on a device.");
  m.def("build_info", &kk::cuda_build_info, "Compile-time facts (architectures, nvcc, cudart).");
}
