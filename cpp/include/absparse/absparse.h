// Umbrella header of the absparse C++ API.
#pragma once

#include "absparse/calibration.h"
#include "absparse/decode.h"
#include "absparse/prefill_masks.h"
#include "absparse/error.h"
#include "absparse/layout.h"
#include "absparse/numeric.h"
#include "absparse/prefill.h"
#include "absparse/quantize.h"
