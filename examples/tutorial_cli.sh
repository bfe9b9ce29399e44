#!/usr/bin/env bash
# The tutorial's recipe (soft-prompt chatbot on Chinese Alpaca) with `fastprompt train`
# instead of a Trainer script. The command's defaults are the tutorial's: init text
# "下面是一段人与机器人的对话。" (its token count is the prompt length), MAX_LENGTH 256,
# 8 examples per optimizer step, lr 5e-5 with linear decay, one epoch, a log line every 10 steps.
#
# Offline it runs on the built-in tiny-bloom and the bundled demo data; the real run is e.g.
#   FASTPROMPT_MODEL=Langboat/bloom-1b4-zh FASTPROMPT_DATA=/alpaca_data_zh examples/tutorial_cli.sh --load-in-8bit
# Extra arguments go to `fastprompt train` (e.g. --max-steps 10 for a quick look).
# FASTPROMPT is the command to run (default: the installed `fastprompt`).
set -euo pipefail

FASTPROMPT=${FASTPROMPT:-fastprompt}
MODEL=${FASTPROMPT_MODEL:-tiny-bloom}
OUTPUT=${FASTPROMPT_OUTPUT:-chatbot}

# shellcheck disable=SC2086  # FASTPROMPT may be a command with arguments
$FASTPROMPT train --model "$MODEL" ${FASTPROMPT_DATA:+--data "$FASTPROMPT_DATA"} --output "$OUTPUT" "$@"

# Inference as in the tutorial: the template is applied to the question.
# shellcheck disable=SC2086
$FASTPROMPT generate --model "$MODEL" --adapter "$OUTPUT" "考试有哪些技巧？" --sample --max-new-tokens 64
