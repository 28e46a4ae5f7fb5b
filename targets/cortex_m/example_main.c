/*
 * Example program of a distillc bundle: runs every input of input_data.h through the model and
 * prints the int8 outputs.  The same file builds for the host (gcc) and for a Cortex-M board
 * under QEMU (-DDISTILLC_BOARD, output through semihosting), where it also measures each
 * inference in executed instructions.
 *
 * What it prints, one line each (distillc's runner parses exactly this):
 *   distillc-output <i>: <DISTILLC_OUTPUT_SIZE integers separated by spaces>
 *   distillc-instructions <i>: <count>                 (board build only)
 *   distillc-stack-bytes: <used> of <reserved>         (board build only)
 *   distillc-done: <n> examples
 * Exit status 0, or 1 as soon as distillc_model_run fails (the reason goes to stderr).
 *
 * A program that does more with each output defines DISTILLC_EXAMPLE_AFTER_RUN(i, output) and
 * includes this file (cortex_m/detect_main.c does): it runs after example i's lines are printed.
 */

#include <stdint.h>
#include <stdio.h>

#include "distillc_model.h"
#include "input_data.h"

#ifdef DISTILLC_BOARD
#include "board.h"
#endif

#if DISTILLC_EXAMPLE_INPUT_SIZE != DISTILLC_INPUT_SIZE
#error "input_data.h was written for another model: its input size differs from DISTILLC_INPUT_SIZE"
#endif

static int8_t output[DISTILLC_OUTPUT_SIZE];

int main(void)
{
    for (int i = 0; i < DISTILLC_EXAMPLE_COUNT; ++i) {
#ifdef DISTILLC_BOARD
        const uint32_t start = distillc_board_ticks();
#endif
        const int status = distillc_model_run(distillc_example_inputs[i], output);
#ifdef DISTILLC_BOARD
        const uint32_t end = distillc_board_ticks();
#endif
        if (status != 0) {
            fprintf(stderr, "distillc-error: distillc_model_run returned %d on example %d\n",
                    status, i);
            return 1;
        }
        printf("distillc-output %d:", i);
        for (int k = 0; k < DISTILLC_OUTPUT_SIZE; ++k) {
            printf(" %d", output[k]);
        }
        printf("\n");
#ifdef DISTILLC_BOARD
        printf("distillc-instructions %d: %llu\n", i, distillc_board_instructions(start, end));
#endif
#ifdef DISTILLC_EXAMPLE_AFTER_RUN
        DISTILLC_EXAMPLE_AFTER_RUN(i, output);
#endif
    }
#ifdef DISTILLC_BOARD
    printf("distillc-stack-bytes: %lu of %lu\n", (unsigned long)distillc_board_stack_used(),
           (unsigned long)distillc_board_stack_size());
#endif
    printf("distillc-done: %d examples\n", DISTILLC_EXAMPLE_COUNT);
    return 0;
}
