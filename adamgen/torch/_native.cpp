// adamgen.torch's step helper: the per-tensor checks of a step, in one C++ call per bucket.
//
// A drop-in optimizer must follow its parameters as torch does (every step re-reads them, and
// each gradient, which zero_grad(set_to_none=True) makes a new tensor at every step), and
// before its kernel writes anything it must know that every pointer it hands the kernel is
// memory the tensors own now. In Python that is five or six attribute reads and method calls
// per tensor; right after a backward pass, with the interpreter's and torch's code evicted from
// the caches, about 1.5 us each: 120 us for the 78 tensors of a small model, more than its
// whole kernel. Here the same reads cost about 0.15 us a tensor.
//
// Every function is a pure check-then-commit: it answers False, having written nothing, for
// anything outside the common case (a missing or odd gradient, a moved parameter, a tensor it
// cannot read). The Python path then takes the step and raises the precise error; this file
// never decides an error message, so it cannot disagree with the Python path about one.
//
// Built by adamgen/torch/_native.py against the running torch's headers (ADAMGEN_MODULE is
// the module's name, which carries the cache key).

#include <Python.h>

#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <vector>

namespace {

// An address passed from Python as an int (a NumPy array's ctypes.data).
template <typename T>
T* address(PyObject* value) {
  return static_cast<T*>(PyLong_AsVoidPtr(value));
}

// same_params(params: list, expected: tuple, pointers: int) -> bool
//
// Whether ``params`` holds exactly the ``expected`` tensor objects, in order, and each one's
// data pointer is still ``pointers[i]`` (a uint64 array): then the group's plan still
// describes it and every parameter pointer the kernel holds is memory that parameter owns.
PyObject* same_params(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "same_params(params, expected, pointers)");
    return nullptr;
  }
  PyObject* params = args[0];
  PyObject* expected = args[1];
  const auto* pointers = address<const uint64_t>(args[2]);
  if (PyErr_Occurred()) return nullptr;
  if (!PyList_CheckExact(params) || !PyTuple_CheckExact(expected)) Py_RETURN_FALSE;
  const Py_ssize_t count = PyList_GET_SIZE(params);
  if (PyTuple_GET_SIZE(expected) != count) Py_RETURN_FALSE;
  try {
    for (Py_ssize_t i = 0; i < count; ++i) {
      PyObject* param = PyList_GET_ITEM(params, i);
      if (param != PyTuple_GET_ITEM(expected, i)) Py_RETURN_FALSE;
      // one of the plan's tensors: checked to be a tensor when the plan was made
      const at::Tensor& tensor = THPVariable_Unpack(param);
      if (reinterpret_cast<uint64_t>(tensor.data_ptr()) != pointers[i]) Py_RETURN_FALSE;
    }
  } catch (const std::exception&) {
    Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

// torch's ``step_t += 1`` on every count when they are all equal (the usual step): the new
// count, rounded to the counts' dtype as torch's add rounds it; NaN (nothing changed) when
// they differ.
template <typename T>
double advance(void* counts, Py_ssize_t count) {
  T* steps = static_cast<T*>(counts);
  for (Py_ssize_t i = 1; i < count; ++i) {
    if (!(steps[i] == steps[0])) return NAN;
  }
  const T next = steps[0] + T(1);
  std::fill(steps, steps + count, next);
  return static_cast<double>(next);
}

// take_grads(params: list, table: int, numels: int, starts: int, ends: int, ranges: int,
//            counts: int, count_size: int) -> bool | float
//
// For the parameters of one bucket (CPU tensors of one dtype, all contiguous): when every one
// has a gradient that is a contiguous CPU tensor of its dtype and element count, none of them
// overlapping a written range [starts[k], ends[k]) (sorted, disjoint: every byte the step
// writes), writes their data pointers to ``table`` (uintptr[count]), bumps every parameter's
// version counter as torch's in-place ops do, and answers True; or, when ``count_size`` is 4 or
// 8 (float32 or float64 step counts at ``counts``) and the counts are all equal, advances them
// and answers the new count. Otherwise it changes nothing and answers False.
PyObject* take_grads(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 8) {
    PyErr_SetString(PyExc_TypeError, "take_grads(params, table, numels, starts, ends, ranges, "
                                     "counts, count_size)");
    return nullptr;
  }
  PyObject* params = args[0];
  auto* table = address<uintptr_t>(args[1]);
  const auto* numels = address<const int64_t>(args[2]);
  const auto* starts = address<const uint64_t>(args[3]);
  const auto* ends = address<const uint64_t>(args[4]);
  const Py_ssize_t ranges = PyLong_AsSsize_t(args[5]);
  void* counts = address<void>(args[6]);
  const long count_size = PyLong_AsLong(args[7]);
  if (PyErr_Occurred()) return nullptr;
  if (!PyList_CheckExact(params)) Py_RETURN_FALSE;
  const Py_ssize_t count = PyList_GET_SIZE(params);
  static thread_local std::vector<uintptr_t> found;
  found.resize(static_cast<size_t>(count));
  try {
    for (Py_ssize_t i = 0; i < count; ++i) {
      const at::Tensor& param = THPVariable_Unpack(PyList_GET_ITEM(params, i));
      const at::Tensor& grad = param.grad();
      if (!grad.defined() || grad.layout() != c10::kStrided || !grad.device().is_cpu() ||
          grad.scalar_type() != param.scalar_type() || grad.numel() != numels[i] ||
          !grad.is_contiguous() || param.is_inference()) {
        Py_RETURN_FALSE;
      }
      const auto start = reinterpret_cast<uint64_t>(grad.data_ptr());
      const uint64_t nbytes = static_cast<uint64_t>(numels[i]) * grad.element_size();
      // the ranges are disjoint: only the last one starting before this gradient's end can
      // overlap it, and does if it ends after the gradient's start
      const uint64_t* after = std::lower_bound(starts, starts + ranges, start + nbytes);
      if (nbytes && after != starts && ends[after - starts - 1] > start) Py_RETURN_FALSE;
      found[static_cast<size_t>(i)] = static_cast<uintptr_t>(start);
    }
    std::copy(found.begin(), found.end(), table);
    for (Py_ssize_t i = 0; i < count; ++i) {
      torch::autograd::impl::bump_version(THPVariable_Unpack(PyList_GET_ITEM(params, i)));
    }
  } catch (const std::exception&) {
    Py_RETURN_FALSE;
  }
  const double next = count_size == 4   ? advance<float>(counts, count)
                      : count_size == 8 ? advance<double>(counts, count)
                                        : NAN;
  if (std::isnan(next)) Py_RETURN_TRUE;
  return PyFloat_FromDouble(next);
}

PyMethodDef methods[] = {
    {"same_params", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(same_params)),
     METH_FASTCALL, "same_params(params, expected, pointers) -> bool"},
    {"take_grads", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(take_grads)),
     METH_FASTCALL,
     "take_grads(params, table, numels, starts, ends, ranges, counts, count_size) -> bool | "
     "float"},
    {nullptr, nullptr, 0, nullptr}};

#define ADAMGEN_STRINGIFY_(name) #name
#define ADAMGEN_STRINGIFY(name) ADAMGEN_STRINGIFY_(name)

PyModuleDef module = {PyModuleDef_HEAD_INIT, ADAMGEN_STRINGIFY(ADAMGEN_MODULE),
                      "adamgen.torch's step helper (adamgen/torch/_native.cpp)", -1, methods,
                      nullptr, nullptr, nullptr, nullptr};

}  // namespace

#define ADAMGEN_INIT_(name) PyInit_##name
#define ADAMGEN_INIT(name) ADAMGEN_INIT_(name)

PyMODINIT_FUNC ADAMGEN_INIT(ADAMGEN_MODULE)(void) { return PyModule_Create(&module); }
