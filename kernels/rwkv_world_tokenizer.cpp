// Greedy longest-match encoder over UTF-8 bytes for the built-in `rwkv_world` tokenizer
// (plugins/rwkv_world.py). It is compiled on first use and called through ctypes, so it has a
// plain C ABI and needs no Python headers.
#include <algorithm>
#include <cstdint>
#include <deque>
#include <new>
#include <utility>
#include <vector>

namespace {

// A double-array trie: the child for byte `b` of the node in cell `p` is cell `cells[p].base + b`
// if that cell's `check` is `p`. One lookup is an add, a load and a compare, with no hashing
// or probing (an open-addressing hash of the edges was 2.5x slower); the World vocabulary's 116k
// nodes fit in about as many 12-byte cells, where 256-way arrays would take 120 MB.
struct Cell {
    int32_t base = 0;    // children's cells start here; 0 for a leaf, whose lookups all fail
    int32_t check = -1;  // the parent's cell; -1 for a free cell, -2 for the root
    int32_t token = -1;  // id of the token that ends here, -1 if none
};

struct Node {  // the plain trie the double array is built from
    int32_t token = -1;
    std::vector<std::pair<uint8_t, int32_t>> children;  // (byte, node)
};

std::vector<Node> plain_trie(const uint8_t* data, const int32_t* lengths, int64_t count) {
    std::vector<Node> nodes(1);
    for (int64_t id = 0; id < count; data += lengths[id], ++id) {
        int32_t node = 0;
        for (int32_t j = 0; j < lengths[id]; ++j) {
            auto& children = nodes[node].children;
            auto it = std::find_if(children.begin(), children.end(), [&](const auto& c) { return c.first == data[j]; });
            if (it != children.end()) {
                node = it->second;
            } else {
                children.emplace_back(data[j], int32_t(nodes.size()));
                node = int32_t(nodes.size());
                nodes.emplace_back();
            }
        }
        if (lengths[id] > 0) nodes[node].token = int32_t(id);
    }
    return nodes;
}

// Place each node's children at the first base where all their cells are free (breadth first,
// so cells fill densely), growing the array so that any base + byte stays in bounds.
std::vector<Cell> double_array(std::vector<Node>& nodes) {
    std::vector<Cell> cells(257);
    cells[0].check = -2;
    size_t first_free = 1;
    std::deque<std::pair<int32_t, int32_t>> queue{{0, 0}};  // (node, its cell)
    for (; !queue.empty(); queue.pop_front()) {
        auto [node, cell] = queue.front();
        auto& children = nodes[node].children;
        if (children.empty()) continue;
        std::sort(children.begin(), children.end());
        auto fits = [&](size_t base) {
            if (cells.size() < base + 256) cells.resize(base + 256);
            return std::all_of(children.begin(), children.end(), [&](const auto& c) { return cells[base + c.first].check == -1; });
        };
        size_t base = std::max<size_t>(1, first_free > children[0].first ? first_free - children[0].first : 0);
        while (!fits(base)) ++base;
        cells[cell].base = int32_t(base);
        for (auto [byte, child] : children) {
            cells[base + byte].check = cell;
            cells[base + byte].token = nodes[child].token;
            queue.emplace_back(child, int32_t(base + byte));
        }
        while (first_free < cells.size() && cells[first_free].check != -1) ++first_free;
    }
    return cells;
}

}  // namespace

extern "C" {

// Build the trie of `count` tokens whose bytes are concatenated in `data`; token i has
// `lengths[i]` bytes (0 = no token with that id). Returns NULL when out of memory.
void* rwkv_trie_new(const uint8_t* data, const int32_t* lengths, int64_t count) {
    try {
        auto nodes = plain_trie(data, lengths, count);
        return new std::vector<Cell>(double_array(nodes));
    } catch (const std::bad_alloc&) {
        return nullptr;
    }
}

void rwkv_trie_free(void* trie) { delete static_cast<std::vector<Cell>*>(trie); }

// Write the ids of `text` (n bytes) to `out` (room for n ids) and return how many there are.
// At each position take the longest token that starts there; the loader guarantees that every
// single byte is a token, so there always is one.
int64_t rwkv_trie_encode(const void* trie, const uint8_t* text, int64_t n, int32_t* out) {
    const Cell* cells = static_cast<const std::vector<Cell>*>(trie)->data();
    int64_t count = 0;
    for (int64_t start = 0; start < n;) {
        int32_t node = 0, best = -1;
        int64_t end = start + 1;
        for (int64_t j = start; j < n; ++j) {
            const int32_t child = cells[node].base + text[j];
            if (cells[child].check != node) break;
            node = child;
            if (cells[node].token >= 0) best = cells[node].token, end = j + 1;
        }
        out[count++] = best;
        start = end;
    }
    return count;
}

}  // extern "C"
