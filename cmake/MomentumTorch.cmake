# LibTorch for the worker: the one bundled in PyPI's torch 2.11.0, installed
# in the project's virtual environment (scripts/python-requirements.txt), and
# found through that environment's Python (MOMENTUM_PYTHON). Defines
# momentum::torch, the target the trainer links, and MOMENTUM_CUDA (ON or
# OFF), which MOMENTUM_WITH_CUDA decides:
#   AUTO  ON where a CUDA toolkit is found (nvcc, headers), OFF elsewhere
#   ON    CUDA and NCCL, or a configure error saying what is missing
#   OFF   the CPU worker, also on a machine with a toolkit
# PyPI's torch is built with CUDA 13 and carries the CUDA runtime libraries
# as nvidia-* packages. Its TorchConfig.cmake needs a CUDA toolkit to
# configure at all, so without one (OFF) momentum::torch is assembled here
# from the wheel's headers and its CPU libraries (libtorch_cpu, libc10),
# which load no CUDA library.

set(MOMENTUM_WITH_CUDA AUTO CACHE STRING
  "Build the worker with CUDA tensors and NCCL: AUTO (where a CUDA toolkit is found), ON or OFF")
set_property(CACHE MOMENTUM_WITH_CUDA PROPERTY STRINGS AUTO ON OFF)
set(MOMENTUM_TORCH_VERSION 2.11.0)

if(NOT EXISTS "${MOMENTUM_PYTHON}")
  message(FATAL_ERROR
    "MOMENTUM_PYTHON: ${MOMENTUM_PYTHON} does not exist. The worker builds on "
    "the LibTorch of PyPI's torch ${MOMENTUM_TORCH_VERSION} in the project's "
    "virtual environment: run scripts/setup.sh --role worker-cpu --build (or "
    "scripts/test.sh), or pass -DMOMENTUM_PYTHON=<python with torch>.")
endif()
# Where torch is and which version, without importing it (that takes seconds).
execute_process(
  COMMAND "${MOMENTUM_PYTHON}" -c
    "import importlib.metadata as m, importlib.util as u, os; s = u.find_spec('torch'); print(os.path.dirname(s.origin) if s else ''); print(m.version('torch') if s else ''); n = u.find_spec('nvidia'); print(list(n.submodule_search_locations)[0] if n else '')"
  OUTPUT_VARIABLE _momentum_torch_probe
  RESULT_VARIABLE _momentum_torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
string(REPLACE "\n" ";" _momentum_torch_probe "${_momentum_torch_probe}")
list(LENGTH _momentum_torch_probe _momentum_torch_n)
if(NOT _momentum_torch_rc EQUAL 0 OR _momentum_torch_n LESS 2)
  message(FATAL_ERROR "MOMENTUM_PYTHON: ${MOMENTUM_PYTHON} failed to say where torch is")
endif()
list(GET _momentum_torch_probe 0 MOMENTUM_TORCH_DIR)
list(GET _momentum_torch_probe 1 _momentum_torch_version)
set(_momentum_nvidia_dir "")
if(_momentum_torch_n GREATER 2)
  list(GET _momentum_torch_probe 2 _momentum_nvidia_dir)
endif()
if(NOT MOMENTUM_TORCH_DIR)
  message(FATAL_ERROR "MOMENTUM_PYTHON: ${MOMENTUM_PYTHON} has no torch; "
    "scripts/setup.sh installs torch ${MOMENTUM_TORCH_VERSION} into .venv")
endif()
# 2.11.0, or a local build of it such as 2.11.0+cu130 (our GPU machines).
if(NOT _momentum_torch_version MATCHES "^2\\.11\\.0($|\\+)")
  message(FATAL_ERROR "MOMENTUM_PYTHON: ${MOMENTUM_PYTHON} has torch "
    "${_momentum_torch_version}; Momentum builds on torch ${MOMENTUM_TORCH_VERSION} "
    "(scripts/python-requirements.txt)")
endif()
set(_momentum_torch_lib "${MOMENTUM_TORCH_DIR}/lib")

# ---- MOMENTUM_WITH_CUDA -> MOMENTUM_CUDA ----
set(_momentum_torch_has_cuda OFF)
if(EXISTS "${_momentum_torch_lib}/libtorch_cuda.so")
  set(_momentum_torch_has_cuda ON)
endif()
if(MOMENTUM_WITH_CUDA STREQUAL "AUTO")
  set(MOMENTUM_CUDA OFF)
  if(_momentum_torch_has_cuda)
    find_package(CUDAToolkit QUIET)
    if(CUDAToolkit_FOUND)
      set(MOMENTUM_CUDA ON)
    endif()
  endif()
elseif(MOMENTUM_WITH_CUDA)
  if(NOT _momentum_torch_has_cuda)
    message(FATAL_ERROR "MOMENTUM_WITH_CUDA=ON, but ${MOMENTUM_TORCH_DIR} is a "
      "torch without CUDA (no lib/libtorch_cuda.so)")
  endif()
  find_package(CUDAToolkit)
  if(NOT CUDAToolkit_FOUND)
    message(FATAL_ERROR "MOMENTUM_WITH_CUDA=ON, but no CUDA toolkit was found "
      "(nvcc on PATH or CUDAToolkit_ROOT); use AUTO or OFF to build the CPU worker")
  endif()
  set(MOMENTUM_CUDA ON)
else()
  set(MOMENTUM_CUDA OFF)
endif()

add_library(momentum_torch INTERFACE)
add_library(momentum::torch ALIAS momentum_torch)
# The wheel's libtorch.so and libtorch_cpu.so carry parts of a newer
# libstdc++ (std::filesystem among them) and export them without symbol
# versions. A binary that names them before libstdc++.so.6 in its NEEDED list
# binds its own std::filesystem calls to those copies, which crash
# (remove_all jumps to a null address). Naming libstdc++ first, before the
# objects, makes every such call bind to the system's libstdc++.
target_link_options(momentum_torch INTERFACE
  "LINKER:--push-state,--no-as-needed,-lstdc++,--pop-state")
if(MOMENTUM_CUDA)
  # The wheel's own CMake config: libtorch, libtorch_cuda, libc10_cuda and
  # the toolkit's CUDA runtime, with USE_C10D_NCCL defined.
  list(APPEND CMAKE_PREFIX_PATH "${MOMENTUM_TORCH_DIR}/share/cmake")
  find_package(Torch REQUIRED CONFIG)
  target_link_libraries(momentum_torch INTERFACE ${TORCH_LIBRARIES})
  # nccl.h of the NCCL the process loads (nvidia-nccl-cu13, next to torch),
  # before the toolkit's own copy, which may be another version.
  if(_momentum_nvidia_dir AND EXISTS "${_momentum_nvidia_dir}/nccl/include/nccl.h")
    target_include_directories(momentum_torch SYSTEM BEFORE INTERFACE
      "${_momentum_nvidia_dir}/nccl/include")
  endif()
  target_compile_definitions(momentum_torch INTERFACE MOMENTUM_WITH_CUDA=1)
else()
  foreach(_lib torch_cpu c10)
    if(NOT EXISTS "${_momentum_torch_lib}/lib${_lib}.so")
      message(FATAL_ERROR "${_momentum_torch_lib}/lib${_lib}.so is missing")
    endif()
  endforeach()
  target_include_directories(momentum_torch SYSTEM INTERFACE
    "${MOMENTUM_TORCH_DIR}/include"
    "${MOMENTUM_TORCH_DIR}/include/torch/csrc/api/include")
  # What the wheel's torch_cpu target defines (Caffe2Targets.cmake).
  target_compile_definitions(momentum_torch INTERFACE
    USE_DISTRIBUTED USE_C10D_GLOO USE_RPC USE_TENSORPIPE)
  # --no-as-needed: operators register themselves when libtorch_cpu loads,
  # whether or not a symbol of it is used directly.
  target_link_libraries(momentum_torch INTERFACE
    "-Wl,--no-as-needed,${_momentum_torch_lib}/libtorch_cpu.so -Wl,--as-needed"
    "${_momentum_torch_lib}/libc10.so" Threads::Threads)
  # Where the linker's -rpath-link and the binaries' run path find them.
  target_link_directories(momentum_torch INTERFACE "${_momentum_torch_lib}")
endif()
message(STATUS "LibTorch: torch ${_momentum_torch_version} in ${MOMENTUM_TORCH_DIR}; "
  "MOMENTUM_WITH_CUDA=${MOMENTUM_WITH_CUDA} -> CUDA and NCCL ${MOMENTUM_CUDA}")
