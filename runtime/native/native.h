// What the files of dscompile's native kernel library share: ONNX Runtime's C++ API (initialized by
// RegisterCustomOps in register.cc) and each kernel file's constructor of its op.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#include <onnxruntime_lite_custom_op.h>

Ort::Custom::OrtLiteCustomOp* NewExpertsQ4();      // moe.cc
Ort::Custom::OrtLiteCustomOp* NewExpertsQ8();      // moe.cc
Ort::Custom::OrtLiteCustomOp* NewHeadsMatMulQ8();  // heads_q8.cc
Ort::Custom::OrtLiteCustomOp* NewLatentAttention();  // attention.cc
Ort::Custom::OrtLiteCustomOp* NewLatentKey();      // rope.cc
Ort::Custom::OrtLiteCustomOp* NewLinearF32();      // f32.cc
Ort::Custom::OrtLiteCustomOp* NewMatMulF32();      // f32.cc
Ort::Custom::OrtLiteCustomOp* NewMatMulQ4();       // matmul.cc
Ort::Custom::OrtLiteCustomOp* NewMatMulQ6();       // matmul.cc
Ort::Custom::OrtLiteCustomOp* NewMatMulQ8();       // matmul.cc
Ort::Custom::OrtLiteCustomOp* NewMoEF32();         // moe.cc
Ort::Custom::OrtLiteCustomOp* NewMoEQ4();          // moe.cc
Ort::Custom::OrtLiteCustomOp* NewMoEQ8();          // moe.cc
Ort::Custom::OrtLiteCustomOp* NewQueryRope();      // rope.cc
