// The extension module fer_kernels._C: plain functions per device, registered as the "cpu" and "cuda"
// implementations of the ops in fer_kernels/ops/. The torch.library custom ops (autograd, fake tensors,
// torch.compile) are defined in Python on top of these, so one op can choose between this module and
// Triton at run time.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace fk = fer_kernels;
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("augment_cpu", &fk::augment_cpu, nogil, py::arg("images"), py::arg("matrices"), py::arg("colour"),
        py::arg("out"), py::arg("mean"), py::arg("std"));
  m.def("batch_norm_act_forward_cpu", &fk::batch_norm_act_forward_cpu, nogil, py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("eps"), py::arg("act"));
  m.def("batch_norm_act_backward_cpu", &fk::batch_norm_act_backward_cpu, nogil, py::arg("grad"), py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("var"), py::arg("eps"), py::arg("act"));
  m.def("fmix_mix_cpu", &fk::fmix_mix_cpu, nogil, py::arg("x"), py::arg("mask"), py::arg("perm"));
  m.def("max_pool2d_forward_cpu", &fk::max_pool2d_forward_cpu, nogil, py::arg("x"), py::arg("kernel_size"),
        py::arg("stride"), py::arg("padding"));
  m.def("max_pool2d_backward_cpu", &fk::max_pool2d_backward_cpu, nogil, py::arg("grad"), py::arg("indices"),
        py::arg("input_size"), py::arg("kernel_size"), py::arg("stride"), py::arg("padding"));
  m.def("mish_forward_cpu", &fk::mish_forward_cpu, nogil, py::arg("x"));
  m.def("mish_backward_cpu", &fk::mish_backward_cpu, nogil, py::arg("grad"), py::arg("x"));
  m.def("recalibrate_forward_cpu", &fk::recalibrate_forward_cpu, nogil, py::arg("x"), py::arg("gate"),
        py::arg("identity"), py::arg("act"));
  m.def("recalibrate_backward_cpu", &fk::recalibrate_backward_cpu, nogil, py::arg("grad"), py::arg("x"),
        py::arg("gate"), py::arg("identity"), py::arg("act"));
  m.def("ranger_step_cpu", &fk::ranger_step_cpu, nogil, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("exp_avg_sqs"), py::arg("slows"), py::arg("plan"), py::arg("scalars"),
        py::arg("copies") = std::vector<at::Tensor>{});
#ifdef FER_KERNELS_WITH_CUDA
  m.def("mish_forward_cuda", &fk::mish_forward_cuda, nogil, py::arg("x"));
  m.def("mish_backward_cuda", &fk::mish_backward_cuda, nogil, py::arg("grad"), py::arg("x"));
  m.def("recalibrate_forward_cuda", &fk::recalibrate_forward_cuda, nogil, py::arg("x"), py::arg("gate"),
        py::arg("identity"), py::arg("act"));
  m.def("recalibrate_backward_cuda", &fk::recalibrate_backward_cuda, nogil, py::arg("grad"), py::arg("x"),
        py::arg("gate"), py::arg("identity"), py::arg("act"));
  m.def("ranger_step_cuda", &fk::ranger_step_cuda, nogil, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("exp_avg_sqs"), py::arg("slows"), py::arg("plan"), py::arg("scalars"));
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
