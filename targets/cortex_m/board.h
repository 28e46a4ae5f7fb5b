/*
 * What the example program (examples/main.c) needs from QEMU's MPS2 boards: an instruction
 * counter and the stack's high-water mark.  main.c includes this header when it is built
 * with -DDISTILLC_BOARD; the host build has neither.
 */
#ifndef DISTILLC_BOARD_H
#define DISTILLC_BOARD_H

#include <stdint.h>

/*
 * The MPS2 FPGA's COUNTER register (FPGAIO base 0x40028000 + 0x18) counts at 25 MHz, i.e. once
 * every 40 ns.  QEMU run with "-icount shift=0" advances virtual time by exactly 1 ns per
 * guest instruction, so one tick is 40 instructions and the count is deterministic.
 * QEMU models no caches or pipeline: these are instructions, not cycles.
 */
#define DISTILLC_BOARD_COUNTER (*(volatile const uint32_t *)0x40028018u)
#define DISTILLC_INSTRUCTIONS_PER_TICK 40u

static inline uint32_t distillc_board_ticks(void)
{
    return DISTILLC_BOARD_COUNTER;
}

/* Instructions executed between two readings of distillc_board_ticks() (to 40 instructions;
 * unsigned arithmetic copes with the counter wrapping once). */
static inline unsigned long long distillc_board_instructions(uint32_t start, uint32_t end)
{
    return (unsigned long long)(uint32_t)(end - start) * DISTILLC_INSTRUCTIONS_PER_TICK;
}

/* The stack's high-water mark (startup code fills the free stack with its pattern). */
#include "board_stack.h"

#endif /* DISTILLC_BOARD_H */
