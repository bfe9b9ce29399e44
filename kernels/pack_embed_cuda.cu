// CUDA backend of fastprompt::pack_embed; compiled only when torch was
// built with CUDA and a CUDA toolkit is found (see CMakeLists.txt). The
// schemas live in pack_embed_cpu.cpp, which every build compiles.
//
// Same algorithm as the CPU backend: forward is one block per row of the
// packed sequence (a prompt row or a kept token's table row, LayerNorm with
// fp32 statistics, one store); backward runs one LayerNorm backward per prompt
// row on its own grad_out row. grad_prompts is the only gradient (the table
// and the LayerNorm parameters are frozen), so token rows are never read.
// Every reduction has a fixed order (block reductions), so results are
// deterministic and no atomics are used.

#include "pack_embed.h"

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
  int64_t id_count;
  int64_t hidden;
  int64_t vocab;
};

RowLayout row_layout(const PackEmbedSizes& sizes) {
  return {sizes.prompt_rows, sizes.id_count, sizes.hidden, sizes.vocab};
}

// Row `row` of the packed sequence: prompt rows first, then the kept tokens.
template <typename scalar_t>
__device__ const scalar_t* source_row(int64_t row, const RowLayout& layout, const int64_t* ids,
                                      const int64_t* token_index, const scalar_t* table, const scalar_t* prompts) {
  if (row < layout.prompt_rows) return prompts + row * layout.hidden;
  const int64_t flat = token_index[row - layout.prompt_rows];
  CUDA_KERNEL_ASSERT(flat >= 0 && flat < layout.id_count);
  const int64_t id = ids[flat];
  CUDA_KERNEL_ASSERT(id >= 0 && id < layout.vocab);
  return table + id * layout.hidden;
}

// One block per packed row. The row is re-read from global memory for each
// pass; after the first pass it is in L1/L2, and this keeps any H legal
// without a shared-memory size limit. Statistics are kept for the prompt
// rows only: the backward needs no others.
template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const int64_t* ids, const int64_t* token_index, const scalar_t* table,
                               const scalar_t* prompts, const acc_t* gamma, const acc_t* beta, acc_t eps,
                               RowLayout layout, scalar_t* out, acc_t* mean, acc_t* rstd) {
  __shared__ acc_t scratch[kThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  const int64_t hidden = layout.hidden;
  const scalar_t* src = source_row(row, layout, ids, token_index, table, prompts);
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
  if (threadIdx.x == 0 && row < layout.prompt_rows) {
    mean[row] = row_mean;
    rstd[row] = row_rstd;
  }
  for (int64_t h = threadIdx.x; h < hidden; h += kThreads) {
    dst[h] = static_cast<scalar_t>((static_cast<acc_t>(src[h]) - row_mean) * row_rstd * gamma[h] + beta[h]);
  }
}

// One block per prompt row: LayerNorm's input gradient
//   dx = rstd * (g*gamma - mean(g*gamma) - xhat * mean(g*gamma*xhat))
// of the row's own grad_out row, with the forward's statistics.
template <typename scalar_t, typename acc_t>
__global__ void prompt_layer_norm_backward_kernel(const scalar_t* grad_out, const scalar_t* prompts,
                                                  const acc_t* mean, const acc_t* rstd, const acc_t* gamma,
                                                  int64_t hidden, acc_t* grad_prompts) {
  __shared__ acc_t scratch[kThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  const scalar_t* grad = grad_out + row * hidden;
  const scalar_t* x = prompts + row * hidden;
  const acc_t row_mean = mean[row];
  const acc_t row_rstd = rstd[row];
  acc_t sum_grad = 0;
  acc_t sum_grad_xhat = 0;
  for (int64_t h = threadIdx.x; h < hidden; h += kThreads) {
    const acc_t scaled = static_cast<acc_t>(grad[h]) * gamma[h];
    sum_grad += scaled;
    sum_grad_xhat += scaled * (static_cast<acc_t>(x[h]) - row_mean) * row_rstd;
  }
  const acc_t mean_grad = block_sum(sum_grad, scratch) / static_cast<acc_t>(hidden);
  const acc_t mean_grad_xhat = block_sum(sum_grad_xhat, scratch) / static_cast<acc_t>(hidden);
  for (int64_t h = threadIdx.x; h < hidden; h += kThreads) {
    const acc_t xhat = (static_cast<acc_t>(x[h]) - row_mean) * row_rstd;
    grad_prompts[row * hidden + h] =
        row_rstd * (static_cast<acc_t>(grad[h]) * gamma[h] - mean_grad - xhat * mean_grad_xhat);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_embed_fwd_cuda(
    const at::Tensor& input_ids, const at::Tensor& token_index, const at::Tensor& prompts, const at::Tensor& weight,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias, double eps) {
  const PackEmbedSizes sizes = check_pack_embed_inputs(input_ids, token_index, prompts, weight, ln_weight, ln_bias);
  const c10::cuda::CUDAGuard device_guard(weight.device());
  const bool layer_norm = ln_weight.has_value();
  const at::Tensor ids = input_ids.to(at::kLong).contiguous();
  const at::Tensor index = token_index.to(at::kLong).contiguous();
  const at::Tensor table = weight.contiguous();
  const at::Tensor prompt_rows = prompts.to(weight.scalar_type()).contiguous();
  at::Tensor gamma;
  at::Tensor beta;
  if (layer_norm) std::tie(gamma, beta) = layer_norm_params(*ln_weight, ln_bias, accumulate_dtype(weight.scalar_type()));
  at::Tensor out;
  at::Tensor mean;
  at::Tensor rstd;
  std::tie(out, mean, rstd) = allocate_forward_outputs(weight, sizes, layer_norm);
  if (sizes.rows() == 0 || sizes.hidden == 0) return {out, mean, rstd};

  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "pack_embed_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(sizes.rows()), kThreads, 0, stream>>>(
        ids.const_data_ptr<int64_t>(), index.const_data_ptr<int64_t>(), table.const_data_ptr<scalar_t>(),
        prompt_rows.const_data_ptr<scalar_t>(), layer_norm ? gamma.const_data_ptr<acc_t>() : nullptr,
        layer_norm ? beta.const_data_ptr<acc_t>() : nullptr, static_cast<acc_t>(eps), row_layout(sizes),
        out.mutable_data_ptr<scalar_t>(), layer_norm ? mean.mutable_data_ptr<acc_t>() : nullptr,
        layer_norm ? rstd.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean, rstd};
}

at::Tensor pack_embed_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& prompts,
                               const std::optional<at::Tensor>& ln_weight, const at::Tensor& mean,
                               const at::Tensor& rstd) {
  const int64_t prompt_rows = check_pack_embed_backward_inputs(grad_out, prompts, ln_weight, mean, rstd);
  const at::Tensor prompt_grad_out = grad_out.narrow(0, 0, prompt_rows);
  if (!ln_weight.has_value()) {
    // A copy, never a view: a custom op's output must not alias its input.
    return prompt_grad_out.reshape(prompts.sizes()).to(prompts.scalar_type(), false, /*copy=*/true);
  }
  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  const at::ScalarType table_dtype = grad_out.scalar_type();
  const at::ScalarType acc_dtype = accumulate_dtype(table_dtype);
  const int64_t hidden = prompts.size(2);
  at::Tensor grad_prompts = at::empty({prompt_rows, hidden}, grad_out.options().dtype(acc_dtype));
  if (prompt_rows == 0 || hidden == 0) return grad_prompts.view(prompts.sizes()).to(prompts.scalar_type());

  const at::Tensor grad = prompt_grad_out.contiguous();
  const at::Tensor prompt_rows_in_table_dtype = prompts.to(table_dtype).contiguous();
  const at::Tensor gamma = ln_weight->to(acc_dtype).contiguous();
  const at::Tensor row_mean = mean.contiguous();
  const at::Tensor row_rstd = rstd.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table_dtype, "pack_embed_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    prompt_layer_norm_backward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(prompt_rows), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), prompt_rows_in_table_dtype.const_data_ptr<scalar_t>(),
        row_mean.const_data_ptr<acc_t>(), row_rstd.const_data_ptr<acc_t>(), gamma.const_data_ptr<acc_t>(), hidden,
        grad_prompts.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_prompts.view(prompts.sizes()).to(prompts.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprompt, CUDA, m) {
  m.impl("pack_embed_fwd", &pack_embed_fwd_cuda);
  m.impl("pack_embed_bwd", &pack_embed_bwd_cuda);
}

}  // namespace fastprompt
