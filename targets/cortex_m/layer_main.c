/*
 * Per-layer counting program of a distillc bundle (Cortex-M boards under QEMU): runs every input
 * of input_data.h through the model and reads the board's instruction counter around every
 * kernel call.  Built with -DDISTILLC_BOARD -DDISTILLC_TRACE -DDISTILLC_TRACE_STEPS=<kernel
 * calls>: the executor (distillc_model.c) then calls distillc_trace() after each kernel, and the
 * hook below charges the instructions since the previous reading to that kernel.  The hook's
 * own bookkeeping lies between two readings and is charged to no kernel; what a kernel is
 * charged besides its own code is the executor's call of it and part of the hook's call.
 *
 * What it prints, one line each (distillc's runner parses exactly this):
 *   distillc-output <i>: <DISTILLC_OUTPUT_SIZE integers separated by spaces>
 *   distillc-layer-instructions <i>: <DISTILLC_TRACE_STEPS counts, one per kernel call, in order>
 *   distillc-instructions <i>: <the whole inference of this build, hooks included>
 *   distillc-stack-bytes: <used> of <reserved>
 *   distillc-done: <n> examples
 * Exit status 0, or 1 as soon as distillc_model_run fails or the hook sees an unexpected step.
 */

#include <stdint.h>
#include <stdio.h>

#include "board.h"
#include "distillc_model.h"
#include "input_data.h"

#if DISTILLC_EXAMPLE_INPUT_SIZE != DISTILLC_INPUT_SIZE
#error "input_data.h was written for another model: its input size differs from DISTILLC_INPUT_SIZE"
#endif
#if !defined(DISTILLC_TRACE_STEPS) || DISTILLC_TRACE_STEPS < 1
#error "define DISTILLC_TRACE_STEPS, the number of kernel calls of the executor"
#endif

void distillc_trace(int step, const void *data, unsigned long bytes);

static int8_t output[DISTILLC_OUTPUT_SIZE];
static uint32_t step_ticks[DISTILLC_TRACE_STEPS];
static uint32_t last_tick;
static int next_step;
static int bad_step = -1;

void distillc_trace(int step, const void *data, unsigned long bytes)
{
    const uint32_t now = distillc_board_ticks();

    (void)data;
    (void)bytes;
    if (step == next_step && step < DISTILLC_TRACE_STEPS) {
        step_ticks[step] = now - last_tick;
        ++next_step;
    } else if (bad_step < 0) {
        bad_step = step;
    }
    last_tick = distillc_board_ticks();
}

int main(void)
{
    for (int i = 0; i < DISTILLC_EXAMPLE_COUNT; ++i) {
        next_step = 0;
        const uint32_t start = distillc_board_ticks();
        last_tick = start;
        const int status = distillc_model_run(distillc_example_inputs[i], output);
        const uint32_t end = distillc_board_ticks();
        if (status != 0) {
            fprintf(stderr, "distillc-error: distillc_model_run returned %d on example %d\n", status, i);
            return 1;
        }
        if (bad_step >= 0 || next_step != DISTILLC_TRACE_STEPS) {
            fprintf(stderr, "distillc-error: the trace hook saw step %d after %d of %d steps on example %d\n",
                    bad_step, next_step, DISTILLC_TRACE_STEPS, i);
            return 1;
        }
        printf("distillc-output %d:", i);
        for (int k = 0; k < DISTILLC_OUTPUT_SIZE; ++k) {
            printf(" %d", output[k]);
        }
        printf("\ndistillc-layer-instructions %d:", i);
        for (int k = 0; k < DISTILLC_TRACE_STEPS; ++k) {
            printf(" %llu", distillc_board_instructions(0u, step_ticks[k]));
        }
        printf("\ndistillc-instructions %d: %llu\n", i, distillc_board_instructions(start, end));
    }
    printf("distillc-stack-bytes: %lu of %lu\n", (unsigned long)distillc_board_stack_used(),
           (unsigned long)distillc_board_stack_size());
    printf("distillc-done: %d examples\n", DISTILLC_EXAMPLE_COUNT);
    return 0;
}
