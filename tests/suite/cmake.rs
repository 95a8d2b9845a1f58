//! The CMake package: an installed sdti found with find_package(sdti CONFIG).
