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

/* startup_<part>.c fills the free stack with this pattern before main runs. */
#define DISTILLC_STACK_PATTERN 0xA5A5A5A5u

/* Bytes of stack used so far: from the top down to the deepest word that no longer holds the
 * pattern.  If it equals the stack's size, the stack overflowed. */
static inline uint32_t distillc_board_stack_used(void)
{
    extern uint32_t __stack_bottom[];
    extern uint32_t __stack_top[];
    const uint32_t *p = __stack_bottom;
    while (p < __stack_top && *p == DISTILLC_STACK_PATTERN) {
        ++p;
    }
    return (uint32_t)((uintptr_t)__stack_top - (uintptr_t)p);
}

/* The stack reserved by the linker script (__stack_size). */
static inline uint32_t distillc_board_stack_size(void)
{
    extern uint32_t __stack_bottom[];
    extern uint32_t __stack_top[];
    return (uint32_t)((uintptr_t)__stack_top - (uintptr_t)__stack_bottom);
}

#endif /* DISTILLC_BOARD_H */
