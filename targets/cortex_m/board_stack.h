/*
 * The stack's high-water mark, for the example program's board builds (-DDISTILLC_BOARD): each
 * board.h includes this file beside it.  The board's startup code fills the free stack with
 * DISTILLC_STACK_PATTERN before main runs; the linker script defines __stack_bottom and
 * __stack_top (__stack_size bytes apart).
 */
#ifndef DISTILLC_BOARD_STACK_H
#define DISTILLC_BOARD_STACK_H

#include <stdint.h>

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

#endif /* DISTILLC_BOARD_STACK_H */
