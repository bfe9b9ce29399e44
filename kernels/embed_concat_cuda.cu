// CUDA backend of fastprompt::embed_concat; compiled only when torch was
// built with CUDA and a CUDA toolkit is found (see CMakeLists.txt). The
// schemas live in embed_concat_cpu.cpp, which every build compiles.
//
// Same algorithm as the CPU backend: forward is one block per output row
// (gather or prompt row, LayerNorm with fp32 statistics, one store); backward
// sums grad_out over the batch for the P prompt rows and runs one LayerNorm
// backward per prompt row. grad_prompt is the only gradient (the table and the
// LayerNorm parameters are frozen), so token rows are never read. Every
// reduction has a fixed order (block reductions, per-column loops), so results
// are deterministic and no atomics are used.

#include "embed_concat.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

namespace fastprompt {
namespace {

constexpr int kThreads = 256;  // per block, a multiple of the warp size
constexpr int kWarpSize = 32;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Sum over the block, returned to every thread. `scratch` holds one value per
// warp; the trailing barrier lets the caller reuse it immediately.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value, acc_t* scratch) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < kThreads / kWarpSize ? scratch[lane] : acc_t(0);
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
    if (lane == 0) scratch[0] = value;
  }
  __syncthreads();
  value = scratch[0];
  __syncthreads();
  return value;
}

struct RowLayout {
  int64_t prompt_rows;
  int64_t tokens;
  int64_t hidden;
  int64_t vocab;

  __device__ int64_t rows_per_item() const { return prompt_rows + tokens; }
};

RowLayout row_layout(const EmbedConcatSizes& sizes) {
  return {sizes.prompt_rows, sizes.tokens, sizes.hidden, sizes.vocab};
}

template <typename scalar_t>
__device__ const scalar_t* source_row(int64_t row, const RowLayout& layout, const int64_t* ids,
                                      const scalar_t* table, const scalar_t* prompt) {
  const int64_t item = row / layout.rows_per_item();
  const int64_t position = row % layout.rows_per_item();
  if (position < layout.prompt_rows) return prompt + position * layout.hidden;
  const int64_t id = ids[item * layout.tokens + position - layout.prompt_rows];
  CUDA_KERNEL_ASSERT(id >= 0 && id < layout.vocab);
  return table + id * layout.hidden;
}

// One block per output row. The row is re-read from global memory for each
// pass; after the first pass it is in L1/L2, and this keeps any H legal
// without a shared-memory size limit.
template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const int64_t* ids, const scalar_t* table, const scalar_t* prompt,
                               const acc_t* gamma, const acc_t* beta, acc_t eps, RowLayout layout, scalar_t* out,
                               acc_t* mean, acc_t* rstd) {
  __shared__ acc_t scratch[kThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  const int64_t hidden = layout.hidden;
  const scalar_t* src = source_row(row, layout, ids, table, prompt);
  scalar_t* dst = out + row * hidden;
  if (gamma == nullptr) {
    for (int64_t h = threadIdx.x; h < hidden; h += kThreads) dst[h] = src[h];
    return;
  }
  acc_t sum = 0;
  for (int64_t h = threadIdx.x; h < hidden; h += kThreads) sum += static_cast<acc_t>(src[h]);
  const acc_t row_mean = block_sum(sum, scratch) / static_cast<acc_t>(hidden);
  acc_t squares = 0;
  for (int64_t h = threadIdx.x; h < hidden; h += kThreads) {
    const acc_t centred = static_cast<acc_t>(src[h]) - row_mean;
    squares += centred * centred;
  }
  const acc_t row_rstd = rsqrt(block_sum(squares, scratch) / static_cast<acc_t>(hidden) + eps);
  if (threadIdx.x == 0) {
    mean[row] = row_mean;
    rstd[row] = row_rstd;
  }
  for (int64_t h = threadIdx.x; h < hidden; h += kThreads) {
    dst[h] = static_cast<scalar_t>((static_cast<acc_t>(src[h]) - row_mean) * row_rstd * gamma[h] + beta[h]);
  }
}

// summed[p, h] = sum_b grad_out[b, p, h]; consecutive threads take
// consecutive h, so every batch item's row is read coalesced.
template <typename scalar_t, typename acc_t>
__global__ void sum_prompt_grad_kernel(const scalar_t* grad_out, int64_t batch, RowLayout layout, acc_t* summed) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (index >= layout.prompt_rows * layout.hidden) return;
  const int64_t prompt_row = index / layout.hidden;
  const int64_t h = index % layout.hidden;
  acc_t total = 0;
  for (int64_t item = 0; item < batch; ++item) {
    total += static_cast<acc_t>(grad_out[(item * layout.rows_per_item() + prompt_row) * layout.hidden + h]);
  }
  summed[index] = total;
}

// The two row means of LayerNorm's input gradient
//   dx = rstd * (g*gamma - mean(g*gamma) - xhat * mean(g*gamma*xhat))
// for one row, computed by the whole block.
template <typename scalar_t, typename acc_t>
__device__ void layer_norm_grad_means(const acc_t* grad, const scalar_t* x, acc_t row_mean, acc_t row_rstd,
                                      const acc_t* gamma, int64_t hidden, acc_t* scratch, acc_t& mean_grad,
                                      acc_t& mean_grad_xhat) {
  acc_t sum_grad = 0;
  acc_t sum_grad_xhat = 0;
  for (int64_t h = threadIdx.x; h < hidden; h += kThreads) {
    const acc_t scaled = grad[h] * gamma[h];
    sum_grad += scaled;
    sum_grad_xhat += scaled * (static_cast<acc_t>(x[h]) - row_mean) * row_rstd;
  }
  mean_grad = block_sum(sum_grad, scratch) / static_cast<acc_t>(hidden);
  mean_grad_xhat = block_sum(sum_grad_xhat, scratch) / static_cast<acc_t>(hidden);
}

// One block per prompt row, fed the batch-summed gradient (LayerNorm's input
// gradient is linear in it). Statistics come from batch item 0.
template <typename scalar_t, typename acc_t>
__global__ void prompt_layer_norm_backward_kernel(const acc_t* summed, const scalar_t* prompt, const acc_t* mean,
                                                  const acc_t* rstd, const acc_t* gamma, RowLayout layout,
                                                  acc_t* grad_prompt) {
  __shared__ acc_t scratch[kThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  const int64_t hidden = layout.hidden;
  const acc_t* grad = summed + row * hidden;
  const scalar_t* x = prompt + row * hidden;
  const acc_t row_mean = mean[row];
  const acc_t row_rstd = rstd[row];
  acc_t mean_grad;
  acc_t mean_grad_xhat;
  layer_norm_grad_means(grad, x, row_mean, row_rstd, gamma, hidden, scratch, mean_grad, mean_grad_xhat);
  for (int64_t h = threadIdx.x; h < hidden; h += kThreads) {
    const acc_t xhat = (static_cast<acc_t>(x[h]) - row_mean) * row_rstd;
    grad_prompt[row * hidden + h] = row_rstd * (grad[h] * gamma[h] - mean_grad - xhat * mean_grad_xhat);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_concat_fwd_cuda(
    const at::Tensor& input_ids, const at::Tensor& weight, const at::Tensor& prompt,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias, double eps) {
  const EmbedConcatSizes sizes = check_embed_concat_inputs(input_ids, weight, prompt, ln_weight, ln_bias);
  const c10::cuda::CUDAGuard device_guard(weight.device());
  const bool layer_norm = ln_weight.has_value();
  const at::Tensor ids = input_ids.to(at::kLong).contiguous();
  const at::Tensor table = weight.contiguous();
  const at::Tensor prompt_rows = prompt.to(weight.scalar_type()).contiguous();
  at::Tensor gamma;
  at::Tensor beta;
  if (layer_norm) std::tie(gamma, beta) = layer_norm_params(*ln_weight, ln_bias, accumulate_dtype(weight.scalar_type()));
  at::Tensor out;
  at::Tensor mean;
  at::Tensor rstd;
  std::tie(out, mean, rstd) = allocate_forward_outputs(weight, sizes, layer_norm);
  const int64_t rows = sizes.batch * sizes.rows_per_item();
  if (rows == 0 || sizes.hidden == 0) return {out, mean, rstd};

  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "embed_concat_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        ids.const_data_ptr<int64_t>(), table.const_data_ptr<scalar_t>(), prompt_rows.const_data_ptr<scalar_t>(),
        layer_norm ? gamma.const_data_ptr<acc_t>() : nullptr, layer_norm ? beta.const_data_ptr<acc_t>() : nullptr,
        static_cast<acc_t>(eps), row_layout(sizes), out.mutable_data_ptr<scalar_t>(),
        layer_norm ? mean.mutable_data_ptr<acc_t>() : nullptr, layer_norm ? rstd.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean, rstd};
}

at::Tensor embed_concat_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& input_ids, const at::Tensor& weight,
                                 const at::Tensor& prompt, const std::optional<at::Tensor>& ln_weight,
                                 const at::Tensor& mean, const at::Tensor& rstd) {
  const EmbedConcatSizes sizes = check_embed_concat_inputs(input_ids, weight, prompt, ln_weight, std::nullopt);
  const bool layer_norm = ln_weight.has_value();
  const at::ScalarType acc_dtype = accumulate_dtype(weight.scalar_type());
  check_embed_concat_backward_inputs(grad_out, mean, rstd, sizes, layer_norm, acc_dtype);
  const c10::cuda::CUDAGuard device_guard(weight.device());

  // Zero-initialised, so an empty batch, prompt or hidden size (nothing to
  // launch) yields a zero gradient.
  const auto acc_options = weight.options().dtype(acc_dtype);
  at::Tensor summed = at::zeros({sizes.prompt_rows, sizes.hidden}, acc_options);
  at::Tensor grad_prompt = layer_norm ? at::zeros_like(summed) : summed;
  if (sizes.batch == 0 || sizes.prompt_rows == 0 || sizes.hidden == 0) return grad_prompt.to(prompt.scalar_type());

  const at::Tensor grad = grad_out.to(weight.scalar_type()).contiguous();
  const at::Tensor prompt_rows = prompt.to(weight.scalar_type()).contiguous();
  const at::Tensor gamma = layer_norm ? ln_weight->to(acc_dtype).contiguous() : at::Tensor();
  const at::Tensor row_mean = mean.contiguous();
  const at::Tensor row_rstd = rstd.contiguous();
  const RowLayout layout = row_layout(sizes);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "embed_concat_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto blocks = static_cast<unsigned>(ceil_div(sizes.prompt_rows * sizes.hidden, kThreads));
    sum_prompt_grad_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), sizes.batch, layout, summed.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (layer_norm) {
      prompt_layer_norm_backward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(sizes.prompt_rows), kThreads, 0, stream>>>(
          summed.const_data_ptr<acc_t>(), prompt_rows.const_data_ptr<scalar_t>(), row_mean.const_data_ptr<acc_t>(),
          row_rstd.const_data_ptr<acc_t>(), gamma.const_data_ptr<acc_t>(), layout,
          grad_prompt.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grad_prompt.to(prompt.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprompt, CUDA, m) {
  m.impl("embed_concat_fwd", &embed_concat_fwd_cuda);
  m.impl("embed_concat_bwd", &embed_concat_bwd_cuda);
}

}  // namespace fastprompt
