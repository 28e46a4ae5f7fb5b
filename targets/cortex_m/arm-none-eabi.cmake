# CMake toolchain file for the Cortex-M builds of a distillc bundle (see CMakeLists.txt).
set(CMAKE_SYSTEM_NAME Generic)
set(CMAKE_SYSTEM_PROCESSOR arm)
set(CMAKE_C_COMPILER arm-none-eabi-gcc)
# CMake's compiler check links a test program; without the bundle's startup code and linker
# script that cannot work on bare metal, so it checks by building a static library instead.
set(CMAKE_TRY_COMPILE_TARGET_TYPE STATIC_LIBRARY)
