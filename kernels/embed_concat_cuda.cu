// CUDA backend of fastprompt::embed_concat; compiled only when torch was
// built with CUDA and a CUDA toolkit is found (see CMakeLists.txt). The
// schemas live in embed_concat_cpu.cpp, which every build compiles.
//
// Same algorithm as the CPU backend: forward is one block per output row
// (gather or prompt row, LayerNorm with fp32 statistics, one store); backward
// sums grad_out over the batch for the P prompt rows and runs one LayerNorm
// backward per prompt row, touching token rows only when the table or the
// LayerNorm parameters need a gradient. Every reduction has a fixed order
// (block reductions, per-column loops, ATen sums over partials), so results
// are deterministic and no atomics are used.

#include "embed_concat.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>

namespace fastprompt {
namespace {

constexpr int kThreads = 256;  // per block, a multiple of the warp size
constexpr int kWarpSize = 32;
// Row groups whose LayerNorm-parameter partial sums are reduced by ATen
// afterwards: enough blocks to fill a GPU at H = 2048 without a large buffer.
constexpr int64_t kParamGradRowGroups = 64;

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
  __device__ int64_t token_output_row(int64_t flat_token) const {
    return (flat_token / tokens) * rows_per_item() + prompt_rows + flat_token % tokens;
  }
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
template <typename grad_t, typename x_t, typename acc_t>
__device__ void layer_norm_grad_means(const grad_t* grad, const x_t* x, acc_t row_mean, acc_t row_rstd,
                                      const acc_t* gamma, int64_t hidden, acc_t* scratch, acc_t& mean_grad,
                                      acc_t& mean_grad_xhat) {
  acc_t sum_grad = 0;
  acc_t sum_grad_xhat = 0;
  for (int64_t h = threadIdx.x; h < hidden; h += kThreads) {
    const acc_t scaled = static_cast<acc_t>(grad[h]) * gamma[h];
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

// Partial LayerNorm-parameter gradients: block (column tile, row group g)
// sums g*xhat and g over rows g, g + groups, ... of the P prompt rows (batch
// summed) followed by the B*T token rows. ATen then sums the groups.
template <typename scalar_t, typename acc_t>
__global__ void layer_norm_param_partials_kernel(const scalar_t* grad_out, const acc_t* summed, const int64_t* ids,
                                                 const scalar_t* table, const scalar_t* prompt, const acc_t* mean,
                                                 const acc_t* rstd, int64_t token_count, RowLayout layout,
                                                 acc_t* partial_gamma, acc_t* partial_beta) {
  const int64_t h = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (h >= layout.hidden) return;
  const int64_t hidden = layout.hidden;
  const int64_t group = blockIdx.y;
  const int64_t groups = gridDim.y;
  acc_t dgamma = 0;
  acc_t dbeta = 0;
  for (int64_t row = group; row < layout.prompt_rows + token_count; row += groups) {
    acc_t g;
    acc_t xhat;
    if (row < layout.prompt_rows) {
      g = summed[row * hidden + h];
      xhat = (static_cast<acc_t>(prompt[row * hidden + h]) - mean[row]) * rstd[row];
    } else {
      const int64_t token = row - layout.prompt_rows;
      const int64_t out_row = layout.token_output_row(token);
      g = static_cast<acc_t>(grad_out[out_row * hidden + h]);
      xhat = (static_cast<acc_t>(table[ids[token] * hidden + h]) - mean[out_row]) * rstd[out_row];
    }
    dgamma += g * xhat;
    dbeta += g;
  }
  partial_gamma[group * hidden + h] = dgamma;
  partial_beta[group * hidden + h] = dbeta;
}

// One block per token row: the two LayerNorm gradient means the table's
// scatter kernel needs.
template <typename scalar_t, typename acc_t>
__global__ void token_grad_means_kernel(const scalar_t* grad_out, const int64_t* ids, const scalar_t* table,
                                        const acc_t* gamma, const acc_t* mean, const acc_t* rstd, RowLayout layout,
                                        acc_t* mean_grad, acc_t* mean_grad_xhat) {
  __shared__ acc_t scratch[kThreads / kWarpSize];
  const int64_t token = blockIdx.x;
  const int64_t row = layout.token_output_row(token);
  acc_t c_grad;
  acc_t c_grad_xhat;
  layer_norm_grad_means(grad_out + row * layout.hidden, table + ids[token] * layout.hidden, mean[row], rstd[row],
                        gamma, layout.hidden, scratch, c_grad, c_grad_xhat);
  if (threadIdx.x == 0) {
    mean_grad[token] = c_grad;
    mean_grad_xhat[token] = c_grad_xhat;
  }
}

// Block (distinct id u, column tile): sums the input gradients of u's tokens
// in a fixed order and writes the table row slice once; no atomics.
template <typename scalar_t, typename acc_t>
__global__ void table_grad_kernel(const scalar_t* grad_out, const scalar_t* table, const acc_t* gamma,
                                  const acc_t* mean, const acc_t* rstd, const acc_t* mean_grad,
                                  const acc_t* mean_grad_xhat, const int64_t* unique_ids, const int64_t* offsets,
                                  const int64_t* positions, RowLayout layout, scalar_t* grad_table) {
  const int64_t h = blockIdx.y * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (h >= layout.hidden) return;
  const int64_t hidden = layout.hidden;
  const int64_t group = blockIdx.x;
  const int64_t id = unique_ids[group];
  const acc_t x = static_cast<acc_t>(table[id * hidden + h]);
  acc_t total = 0;
  for (int64_t k = offsets[group]; k < offsets[group + 1]; ++k) {
    const int64_t token = positions[k];
    const int64_t row = layout.token_output_row(token);
    const acc_t g = static_cast<acc_t>(grad_out[row * hidden + h]);
    if (gamma == nullptr) {
      total += g;
    } else {
      const acc_t xhat = (x - mean[row]) * rstd[row];
      total += rstd[row] * (g * gamma[h] - mean_grad[token] - xhat * mean_grad_xhat[token]);
    }
  }
  grad_table[id * hidden + h] = static_cast<scalar_t>(total);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> embed_concat_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& input_ids, const at::Tensor& weight, const at::Tensor& prompt,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias, const at::Tensor& mean,
    const at::Tensor& rstd, bool need_grad_prompt, bool need_grad_weight, bool need_grad_ln) {
  const EmbedConcatSizes sizes = check_embed_concat_inputs(input_ids, weight, prompt, ln_weight, ln_bias);
  const bool layer_norm = ln_weight.has_value();
  const bool want_ln_grads = need_grad_ln && layer_norm;
  const at::ScalarType acc_dtype = accumulate_dtype(weight.scalar_type());
  check_embed_concat_backward_inputs(grad_out, mean, rstd, sizes, layer_norm, acc_dtype);
  const c10::cuda::CUDAGuard device_guard(weight.device());

  // Zero-initialised, so an empty batch or hidden size (nothing to launch)
  // yields zero gradients.
  const auto acc_options = weight.options().dtype(acc_dtype);
  const bool need_summed = need_grad_prompt || want_ln_grads;
  at::Tensor summed = need_summed ? at::zeros({sizes.prompt_rows, sizes.hidden}, acc_options) : at::Tensor();
  at::Tensor grad_prompt;
  if (need_grad_prompt) grad_prompt = layer_norm ? at::zeros_like(summed) : summed;
  at::Tensor grad_gamma = want_ln_grads ? at::zeros({sizes.hidden}, acc_options) : at::Tensor();
  at::Tensor grad_beta = want_ln_grads && ln_bias.has_value() ? at::zeros({sizes.hidden}, acc_options) : at::Tensor();
  at::Tensor grad_table = need_grad_weight ? at::zeros_like(weight, at::MemoryFormat::Contiguous) : at::Tensor();
  if (sizes.batch == 0 || sizes.hidden == 0 || !(need_summed || need_grad_weight)) {
    return package_gradients(weight, prompt, ln_weight, ln_bias, grad_prompt, grad_table, grad_gamma, grad_beta);
  }

  const at::Tensor grad = grad_out.to(weight.scalar_type()).contiguous();
  const at::Tensor ids = input_ids.to(at::kLong).contiguous();
  const at::Tensor table = weight.contiguous();
  const at::Tensor prompt_rows = prompt.to(weight.scalar_type()).contiguous();
  at::Tensor gamma;
  at::Tensor beta;
  if (layer_norm) std::tie(gamma, beta) = layer_norm_params(*ln_weight, ln_bias, acc_dtype);
  const at::Tensor row_mean = mean.contiguous();
  const at::Tensor row_rstd = rstd.contiguous();
  const int64_t token_count = sizes.batch * sizes.tokens;
  const int64_t param_row_groups = std::min(kParamGradRowGroups, std::max<int64_t>(1, sizes.prompt_rows + token_count));
  const at::Tensor partial_gamma = want_ln_grads ? at::empty({param_row_groups, sizes.hidden}, acc_options) : at::Tensor();
  const at::Tensor partial_beta = want_ln_grads ? at::empty_like(partial_gamma) : at::Tensor();
  const at::Tensor token_mean_grad =
      need_grad_weight && layer_norm ? at::empty({token_count}, acc_options) : at::Tensor();
  const at::Tensor token_mean_grad_xhat = need_grad_weight && layer_norm ? at::empty_like(token_mean_grad) : at::Tensor();
  const TokensById groups = need_grad_weight ? group_tokens_by_id(ids) : TokensById{};
  const RowLayout layout = row_layout(sizes);
  const int64_t column_tiles = ceil_div(sizes.hidden, kThreads);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "embed_concat_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* grad_ptr = grad.const_data_ptr<scalar_t>();
    const int64_t* ids_ptr = ids.const_data_ptr<int64_t>();
    const scalar_t* table_ptr = table.const_data_ptr<scalar_t>();
    const scalar_t* prompt_ptr = prompt_rows.const_data_ptr<scalar_t>();
    const acc_t* gamma_ptr = layer_norm ? gamma.const_data_ptr<acc_t>() : nullptr;
    const acc_t* mean_ptr = layer_norm ? row_mean.const_data_ptr<acc_t>() : nullptr;
    const acc_t* rstd_ptr = layer_norm ? row_rstd.const_data_ptr<acc_t>() : nullptr;

    if (need_summed && sizes.prompt_rows > 0) {
      const auto blocks = static_cast<unsigned>(ceil_div(sizes.prompt_rows * sizes.hidden, kThreads));
      sum_prompt_grad_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(grad_ptr, sizes.batch, layout,
                                                                                summed.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_grad_prompt && layer_norm && sizes.prompt_rows > 0) {
      prompt_layer_norm_backward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(sizes.prompt_rows), kThreads, 0, stream>>>(
          summed.const_data_ptr<acc_t>(), prompt_ptr, mean_ptr, rstd_ptr, gamma_ptr, layout,
          grad_prompt.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (want_ln_grads) {
      const dim3 grid(static_cast<unsigned>(column_tiles), static_cast<unsigned>(param_row_groups));
      layer_norm_param_partials_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          grad_ptr, summed.const_data_ptr<acc_t>(), ids_ptr, table_ptr, prompt_ptr, mean_ptr,
          rstd_ptr, token_count, layout, partial_gamma.mutable_data_ptr<acc_t>(),
          partial_beta.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_grad_weight && token_count > 0) {
      if (layer_norm) {
        token_grad_means_kernel<scalar_t, acc_t><<<static_cast<unsigned>(token_count), kThreads, 0, stream>>>(
            grad_ptr, ids_ptr, table_ptr, gamma_ptr, mean_ptr, rstd_ptr, layout,
            token_mean_grad.mutable_data_ptr<acc_t>(), token_mean_grad_xhat.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const dim3 grid(static_cast<unsigned>(groups.ids.numel()), static_cast<unsigned>(column_tiles));
      table_grad_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          grad_ptr, table_ptr, gamma_ptr, mean_ptr, rstd_ptr,
          layer_norm ? token_mean_grad.const_data_ptr<acc_t>() : nullptr,
          layer_norm ? token_mean_grad_xhat.const_data_ptr<acc_t>() : nullptr, groups.ids.const_data_ptr<int64_t>(),
          groups.offsets.const_data_ptr<int64_t>(), groups.positions.const_data_ptr<int64_t>(), layout,
          grad_table.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });

  if (want_ln_grads) {
    grad_gamma = partial_gamma.sum(0);
    if (grad_beta.defined()) grad_beta = partial_beta.sum(0);
  }
  return package_gradients(weight, prompt, ln_weight, ln_bias, grad_prompt, grad_table, grad_gamma, grad_beta);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprompt, CUDA, m) {
  m.impl("embed_concat_fwd", &embed_concat_fwd_cuda);
  m.impl("embed_concat_bwd", &embed_concat_bwd_cuda);
}

}  // namespace fastprompt
