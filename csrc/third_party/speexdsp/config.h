/* Build configuration of the vendored SpeexDSP echo canceller and preprocessor
   (written for listenloop; replaces the configure-generated config.h). */
#ifndef LISTENLOOP_SPEEXDSP_CONFIG_H
#define LISTENLOOP_SPEEXDSP_CONFIG_H
#define FLOATING_POINT 1
#define USE_SMALLFT 1
#define EXPORT
/* A library inside a runtime prints nothing: its diagnostics would interleave with the CLI's. */
#define DISABLE_WARNINGS 1
#define DISABLE_NOTIFICATIONS 1
#endif
