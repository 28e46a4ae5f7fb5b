/*
 * What the example program (examples/main.c) needs from an STM32F4 when it is built with
 * -DDISTILLC_BOARD: a counter and the stack's high-water mark.
 *
 * The counter is TIM2, the 32-bit general-purpose timer, with no prescaler.  QEMU 7.2 clocks
 * its STM32 timers from virtual time at 1 GHz, and "-icount shift=0" advances virtual time by
 * exactly 1 ns per guest instruction: on QEMU's netduinoplus2 one TIM2 tick is one executed
 * instruction, deterministic.  (QEMU models no DWT cycle counter there: DWT_CYCCNT reads 0.
 * SysTick counts at 168 MHz of virtual time, about one tick per 6 instructions.)  QEMU models
 * no caches, pipeline or flash wait states: these are instructions, not cycles.
 *
 * On a real STM32F4 TIM2 counts its timer clock instead (APB1's clock, times 2 when APB1 is
 * divided: 16 MHz, one tick per core cycle, after reset), so the "instructions" the example
 * prints there are timer ticks.
 */
#ifndef DISTILLC_BOARD_H
#define DISTILLC_BOARD_H

#include <stdint.h>

#define DISTILLC_RCC_APB1ENR (*(volatile uint32_t *)0x40023840u)
#define DISTILLC_RCC_APB1ENR_TIM2EN (1u << 0)
#define DISTILLC_TIM2_CR1 (*(volatile uint32_t *)0x40000000u)
#define DISTILLC_TIM2_EGR (*(volatile uint32_t *)0x40000014u)
#define DISTILLC_TIM2_CNT (*(volatile const uint32_t *)0x40000024u)
#define DISTILLC_TIM2_PSC (*(volatile uint32_t *)0x40000028u)
#define DISTILLC_TIM2_ARR (*(volatile uint32_t *)0x4000002Cu)
#define DISTILLC_INSTRUCTIONS_PER_TICK 1u

/* Starts TIM2 the first time (free-running, 32 bits, no prescaler) and reads it. */
static inline uint32_t distillc_board_ticks(void)
{
    if ((DISTILLC_TIM2_CR1 & 1u) == 0) {
        DISTILLC_RCC_APB1ENR |= DISTILLC_RCC_APB1ENR_TIM2EN;
        (void)DISTILLC_RCC_APB1ENR; /* the clock is on before TIM2 is written */
        DISTILLC_TIM2_PSC = 0;
        DISTILLC_TIM2_ARR = 0xFFFFFFFFu;
        DISTILLC_TIM2_EGR = 1u; /* load PSC */
        DISTILLC_TIM2_CR1 = 1u; /* CEN */
    }
    return DISTILLC_TIM2_CNT;
}

/* Instructions executed between two readings of distillc_board_ticks() (unsigned arithmetic
 * copes with the counter wrapping once, after 2^32 instructions). */
static inline unsigned long long distillc_board_instructions(uint32_t start, uint32_t end)
{
    return (unsigned long long)(uint32_t)(end - start) * DISTILLC_INSTRUCTIONS_PER_TICK;
}

/* The stack's high-water mark (startup code fills the free stack with its pattern). */
#include "board_stack.h"

#endif /* DISTILLC_BOARD_H */
