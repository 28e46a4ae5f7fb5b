/*
 * Detection program of a distillc bundle with distillc_detect (runner.detect_on_host and
 * detect_on_qemu): for every input of input_data.h it runs the model and prints its int8 map,
 * then, for every case of detect_config.h (dim, score threshold in Q15, max_out), runs
 * distillc_detect on the input and distillc_detect_output on the map and prints both results.
 * The same file builds for the host (gcc) and for a Cortex-M board under QEMU (-DDISTILLC_BOARD),
 * where it also counts the instructions of each call.
 *
 * What it prints, one line each (distillc's runner parses exactly this):
 *   distillc-output <i>: <DISTILLC_OUTPUT_SIZE integers>
 *   distillc-detect <i> <case>: <returned> <x0 y0 x1 y1 score_q15 class_id, per detection>
 *   distillc-detect-output <i> <case>: <returned> <the same six per detection>
 *   distillc-detect-instructions <i> <case>: <distillc_detect> <distillc_detect_output>   (board only)
 *   distillc-instructions <i>: <count>                  (board only: distillc_model_run)
 *   distillc-stack-bytes: <used> of <reserved>          (board only)
 *   distillc-done: <n> examples
 */

#include <stdint.h>
#include <stdio.h>

#include "distillc_model.h"
#include "input_data.h"
#include "detect_config.h"

#ifdef DISTILLC_BOARD
#include "board.h"
#endif

#if DISTILLC_EXAMPLE_INPUT_SIZE != DISTILLC_INPUT_SIZE
#error "input_data.h was written for another model: its input size differs from DISTILLC_INPUT_SIZE"
#endif

static int8_t output[DISTILLC_OUTPUT_SIZE];
static distillc_detection_t detections[DISTILLC_DETECT_RUN_ARRAY];

static void print_detections(const char *what, int i, int c, int count)
{
    printf("%s %d %d: %d", what, i, c, count);
    for (int k = 0; k < count; ++k) {
        const distillc_detection_t *d = &detections[k];
        printf(" %ld %ld %ld %ld %ld %ld", (long)d->x0, (long)d->y0, (long)d->x1, (long)d->y1,
               (long)d->score_q15, (long)d->class_id);
    }
    printf("\n");
}

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
            fprintf(stderr, "distillc-error: distillc_model_run returned %d on example %d\n", status, i);
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
        for (int c = 0; c < DISTILLC_DETECT_RUN_CASES; ++c) {
            const int dim = (int)distillc_detect_run_cases[c][0];
            const int32_t threshold = distillc_detect_run_cases[c][1];
            const int max_out = (int)distillc_detect_run_cases[c][2];
#ifdef DISTILLC_BOARD
            const uint32_t t0 = distillc_board_ticks();
#endif
            int count = distillc_detect(distillc_example_inputs[i], dim, threshold, detections, max_out);
#ifdef DISTILLC_BOARD
            const uint32_t t1 = distillc_board_ticks();
#endif
            print_detections("distillc-detect", i, c, count);
#ifdef DISTILLC_BOARD
            const uint32_t t2 = distillc_board_ticks();
#endif
            count = distillc_detect_output(output, dim, threshold, detections, max_out);
#ifdef DISTILLC_BOARD
            const uint32_t t3 = distillc_board_ticks();
            printf("distillc-detect-instructions %d %d: %llu %llu\n", i, c, distillc_board_instructions(t0, t1),
                   distillc_board_instructions(t2, t3));
#endif
            print_detections("distillc-detect-output", i, c, count);
        }
    }
#ifdef DISTILLC_BOARD
    printf("distillc-stack-bytes: %lu of %lu\n", (unsigned long)distillc_board_stack_used(),
           (unsigned long)distillc_board_stack_size());
#endif
    printf("distillc-done: %d examples\n", DISTILLC_EXAMPLE_COUNT);
    return 0;
}
