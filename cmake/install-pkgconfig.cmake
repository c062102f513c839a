# Runs at install time (install(SCRIPT) in CMakeLists.txt): writes bottomless.pc
# with the prefix actually installed to — `cmake --install --prefix P` or
# CPack's /usr — so pkg-config prints plain absolute paths. The variables
# BOTTOMLESS_PC_* and PROJECT_VERSION are set by an install(CODE) just before.
set(BOTTOMLESS_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
configure_file("${BOTTOMLESS_PC_IN}" "${BOTTOMLESS_PC_OUT}" @ONLY)
file(INSTALL DESTINATION "${CMAKE_INSTALL_PREFIX}/${BOTTOMLESS_PC_LIBDIR}/pkgconfig" TYPE FILE FILES "${BOTTOMLESS_PC_OUT}")
