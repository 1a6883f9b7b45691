// UTF-8 for text that crosses the API: proto3 `string` fields must hold
// valid UTF-8, and a message with anything else fails to serialize, so a
// rank's output (any bytes) is made valid before it becomes a LogLine, a
// RankOutput or a state reason.
//
//   std::string line = ToValidUtf8(raw);        // bad bytes -> U+FFFD
//   size_t n = Utf8CutPoint(line, 16384);       // a piece that ends whole
#ifndef MOMENTUM_COMMON_UTF8_H_
#define MOMENTUM_COMMON_UTF8_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace momentum {

// `text` with every byte that does not belong to a well-formed UTF-8
// sequence (RFC 3629: no overlong forms, surrogates or code points past
// U+10FFFF) replaced by U+FFFD, the replacement character. Valid text is
// returned unchanged.
std::string ToValidUtf8(std::string_view text);

// The length of the well-formed UTF-8 sequence that starts at text[i]
// (1 to 4; i < text.size()), with its code point in `*code_point` when
// not null; 0 when the bytes there are not one.
size_t Utf8SequenceAt(std::string_view text, size_t i,
                      uint32_t* code_point = nullptr);

// The longest prefix of valid UTF-8 `text` of at most `max_bytes` bytes
// that does not end inside a sequence: `max_bytes` itself when the text is
// shorter or the cut falls between characters.
size_t Utf8CutPoint(std::string_view text, size_t max_bytes);

}  // namespace momentum

#endif  // MOMENTUM_COMMON_UTF8_H_
