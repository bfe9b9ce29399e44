// Shared by the CPU and CUDA backends of fastprompt::pack_embed: argument
// checks and output layout. Everything here is host code built from ATen
// calls, so both translation units agree on shapes and dtypes by
// construction; the Python fake kernels in fastprompt/ops/native.py mirror
// the same rules.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastprompt {

struct PackEmbedSizes {
  int64_t prompt_rows;  // A*P
  int64_t kept;         // K
  int64_t id_count;     // B*T, the flat ids token_index points into
  int64_t hidden;
  int64_t vocab;

  int64_t rows() const { return prompt_rows + kept; }
};

// LayerNorm statistics and every reduction run in this type: fp32 for the
// 16-bit formats and for fp32, fp64 for fp64 (gradcheck).
inline at::ScalarType accumulate_dtype(at::ScalarType weight_dtype) {
  return weight_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_index_dtype(at::ScalarType dtype) { return dtype == at::kLong || dtype == at::kInt; }

inline PackEmbedSizes check_pack_embed_inputs(const at::Tensor& input_ids, const at::Tensor& token_index,
                                              const at::Tensor& prompts, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& ln_weight,
                                              const std::optional<at::Tensor>& ln_bias) {
  TORCH_CHECK(input_ids.dim() == 2, "pack_embed: input_ids must be [B, T], got ", input_ids.sizes());
  TORCH_CHECK(is_index_dtype(input_ids.scalar_type()), "pack_embed: input_ids must be int64 or int32, got ",
              input_ids.scalar_type());
  TORCH_CHECK(token_index.dim() == 1, "pack_embed: token_index must be [K], got ", token_index.sizes());
  TORCH_CHECK(is_index_dtype(token_index.scalar_type()), "pack_embed: token_index must be int64 or int32, got ",
              token_index.scalar_type());
  TORCH_CHECK(weight.dim() == 2, "pack_embed: weight must be [V, H], got ", weight.sizes());
  TORCH_CHECK(prompts.dim() == 3 && prompts.size(2) == weight.size(1), "pack_embed: prompts must be [A, P, ",
              weight.size(1), "], got ", prompts.sizes());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()) && at::isFloatingType(prompts.scalar_type()),
              "pack_embed: weight and prompts must be floating point");
  TORCH_CHECK(!ln_bias.has_value() || ln_weight.has_value(),
              "pack_embed: ln_bias without ln_weight (the reference applies no LayerNorm then)");

  const auto device = weight.device();
  TORCH_CHECK(input_ids.device() == device && token_index.device() == device && prompts.device() == device,
              "pack_embed: input_ids, token_index, prompts and weight must share a device");
  for (const auto* param : {&ln_weight, &ln_bias}) {
    if (param->has_value()) {
      const at::Tensor& t = param->value();
      TORCH_CHECK(t.dim() == 1 && t.size(0) == weight.size(1), "pack_embed: LayerNorm parameters must be [",
                  weight.size(1), "], got ", t.sizes());
      TORCH_CHECK(t.device() == device, "pack_embed: LayerNorm parameters must be on ", device);
      TORCH_CHECK(at::isFloatingType(t.scalar_type()), "pack_embed: LayerNorm parameters must be floating point");
    }
  }
  return {prompts.size(0) * prompts.size(1), token_index.size(0), input_ids.numel(), weight.size(1),
          weight.size(0)};
}

// gamma and beta as contiguous accumulate-dtype vectors; a missing bias
// becomes zeros so kernels need no bias branch (H values, negligible).
inline std::tuple<at::Tensor, at::Tensor> layer_norm_params(const at::Tensor& ln_weight,
                                                            const std::optional<at::Tensor>& ln_bias,
                                                            at::ScalarType acc_dtype) {
  at::Tensor gamma = ln_weight.to(acc_dtype).contiguous();
  at::Tensor beta = ln_bias.has_value() ? ln_bias->to(acc_dtype).contiguous() : at::zeros_like(gamma);
  return {gamma, beta};
}

// Forward outputs: out [A*P + K, H] in weight's dtype; the prompt rows'
// LayerNorm mean and rstd [A*P] in the accumulate dtype (the backward needs
// no others), or empty [0] when there is no LayerNorm.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_forward_outputs(const at::Tensor& weight,
                                                                               const PackEmbedSizes& sizes,
                                                                               bool layer_norm) {
  at::Tensor out = at::empty({sizes.rows(), sizes.hidden}, weight.options());
  const auto stats_options = weight.options().dtype(accumulate_dtype(weight.scalar_type()));
  const std::vector<int64_t> stats_shape = {layer_norm ? sizes.prompt_rows : 0};
  return {out, at::empty(stats_shape, stats_options), at::empty(stats_shape, stats_options)};
}

// Backward inputs; returns A*P. grad_out's dtype is the table's (autograd
// hands back a gradient in the output's dtype), which is what the prompts were
// rounded to in the forward.
inline int64_t check_pack_embed_backward_inputs(const at::Tensor& grad_out, const at::Tensor& prompts,
                                                const std::optional<at::Tensor>& ln_weight, const at::Tensor& mean,
                                                const at::Tensor& rstd) {
  TORCH_CHECK(prompts.dim() == 3, "pack_embed_bwd: prompts must be [A, P, H], got ", prompts.sizes());
  const int64_t prompt_rows = prompts.size(0) * prompts.size(1);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) >= prompt_rows && grad_out.size(1) == prompts.size(2),
              "pack_embed_bwd: grad_out must be [A*P + K, H] for prompts ", prompts.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(at::isFloatingType(grad_out.scalar_type()), "pack_embed_bwd: grad_out must be floating point");
  TORCH_CHECK(grad_out.device() == prompts.device(), "pack_embed_bwd: grad_out and prompts must share a device");
  if (!ln_weight.has_value()) return prompt_rows;
  TORCH_CHECK(ln_weight->dim() == 1 && ln_weight->size(0) == prompts.size(2) &&
                  ln_weight->device() == prompts.device(),
              "pack_embed_bwd: ln_weight must be [", prompts.size(2), "] on ", prompts.device());
  const at::ScalarType acc_dtype = accumulate_dtype(grad_out.scalar_type());
  for (const at::Tensor* stats : {&mean, &rstd}) {
    TORCH_CHECK(stats->sizes() == at::IntArrayRef({prompt_rows}) && stats->scalar_type() == acc_dtype &&
                    stats->device() == grad_out.device(),
                "pack_embed_bwd: mean/rstd must be the forward's [A*P] ", acc_dtype, " statistics");
  }
  return prompt_rows;
}

}  // namespace fastprompt
