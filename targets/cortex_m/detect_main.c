/*
 * Detection program of a distillc bundle with distillc_detect (runner.detect_on_host and
 * detect_on_qemu): the example program (example_main.c, included below) runs the model on every
 * input of input_data.h and prints its int8 map; then, for every case of detect_config.h (dim,
 * score threshold in Q15, max_out), this file runs distillc_detect on the input and
 * distillc_detect_output on the map and prints both results.  The same file builds for the host
 * (gcc) and for a Cortex-M board under QEMU (-DDISTILLC_BOARD), where it also counts the
 * instructions of each call.
 *
 * What it prints, one line each (distillc's runner parses exactly this):
 *   distillc-output <i>: <DISTILLC_OUTPUT_SIZE integers>
 *   distillc-instructions <i>: <count>                  (board only: distillc_model_run)
 *   distillc-detect <i> <case>: <returned> <x0 y0 x1 y1 score_q15 class_id, per detection>
 *   distillc-detect-output <i> <case>: <returned> <the same six per detection>
 *   distillc-detect-instructions <i> <case>: <distillc_detect> <distillc_detect_output>   (board only)
 *   distillc-stack-bytes: <used> of <reserved>          (board only)
 *   distillc-done: <n> examples
 */

#include <stdint.h>
#include <stdio.h>

#include "distillc_model.h"
#include "detect_config.h"

#ifdef DISTILLC_BOARD
#include "board.h"
#endif

static void run_detect_cases(int i, const int8_t *map);

#define DISTILLC_EXAMPLE_AFTER_RUN(i, output) run_detect_cases((i), (output))
#include "example_main.c"

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

/* Every case of detect_config.h on example i: distillc_detect on its input, then
 * distillc_detect_output on the map the model computed for it. */
static void run_detect_cases(int i, const int8_t *map)
{
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
        count = distillc_detect_output(map, dim, threshold, detections, max_out);
#ifdef DISTILLC_BOARD
        const uint32_t t3 = distillc_board_ticks();
        printf("distillc-detect-instructions %d %d: %llu %llu\n", i, c, distillc_board_instructions(t0, t1),
               distillc_board_instructions(t2, t3));
#endif
        print_detections("distillc-detect-output", i, c, count);
    }
}
