/*
 * Trace program of a distillc bundle (host only, built with -DDISTILLC_TRACE): runs every input
 * of input_data.h through the model and writes the output of every kernel to trace.bin, so
 * distillc can compare each kernel with onnxruntime on that kernel's own inputs.
 *
 * trace.bin: for each example and each kernel call, in order, a header of three little-endian
 * uint32 (example, step, bytes) followed by the bytes of the kernel's output tensor.
 */
#include <stdint.h>
#include <stdio.h>

#include "distillc_model.h"
#include "input_data.h"

void distillc_trace(int step, const void *data, unsigned long bytes);

static FILE *trace_file;
static uint32_t current_example;

void distillc_trace(int step, const void *data, unsigned long bytes)
{
    uint32_t header[3];

    header[0] = current_example;
    header[1] = (uint32_t)step;
    header[2] = (uint32_t)bytes;
    if (fwrite(header, sizeof header, 1, trace_file) != 1 || fwrite(data, 1, bytes, trace_file) != bytes) {
        fprintf(stderr, "distillc-trace: cannot write trace.bin\n");
    }
}

int main(void)
{
    static int8_t output[DISTILLC_OUTPUT_SIZE];

    trace_file = fopen("trace.bin", "wb");
    if (trace_file == NULL) {
        fprintf(stderr, "distillc-trace: cannot open trace.bin\n");
        return 1;
    }
    for (int i = 0; i < DISTILLC_EXAMPLE_COUNT; ++i) {
        current_example = (uint32_t)i;
        if (distillc_model_run(distillc_example_inputs[i], output) != 0) {
            fprintf(stderr, "distillc-trace: distillc_model_run failed on example %d\n", i);
            return 1;
        }
    }
    return fclose(trace_file) == 0 ? 0 : 1;
}
