"""Tiny, randomly initialised CLIPSeg, BLIP and Florence-2 models built from configs and saved as local folders.

The production code loads them by path exactly as it loads the real checkpoints. The captioners' output layer is
biased towards one word, so a test can tell that a caption really went through generate() and decoding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.models.tokenizer import bytes_to_unicode, write_clip_tokenizer

#: The word the tiny captioners say, whatever they see.
CAPTION_WORD = "zebra"


def _byte_symbols() -> list[str]:
    # GPT-2's byte -> printable character table is BART's byte-level BPE alphabet too.
    return list(bytes_to_unicode().values())


def build_clipseg(folder: Path) -> Path:
    from transformers import (
        CLIPImageProcessorPil,
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        CLIPSegTextConfig,
        CLIPSegVisionConfig,
        CLIPTokenizer,
    )

    write_clip_tokenizer(folder / "_tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "_tokenizer")
    processor = CLIPSegProcessor(
        image_processor=CLIPImageProcessorPil(size={"height": 64, "width": 64}, do_center_crop=False),
        tokenizer=tokenizer,
    )
    text = CLIPSegTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                             eos_token_id=49407, pad_token_id=49407)
    vision = CLIPSegVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=64, patch_size=16)
    config = CLIPSegConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32,
                           reduce_dim=16, extract_layers=[1], decoder_num_attention_heads=2,
                           decoder_intermediate_size=32)
    torch.manual_seed(0)
    CLIPSegForImageSegmentation(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_blip(folder: Path) -> Path:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", CAPTION_WORD, "."]
    vocab = {word: i for i, word in enumerate(words)}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = BlipTextConfig(vocab_size=len(words), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                          num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64,
                          bos_token_id=vocab["[CLS]"], sep_token_id=vocab["[SEP]"], pad_token_id=vocab["[PAD]"],
                          projection_dim=32)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                                    projection_dim=32))
    with torch.no_grad():  # the language head prefers CAPTION_WORD over everything, end of text included
        bias = model.text_decoder.cls.predictions.bias
        bias.fill_(-10.0)
        bias[vocab[CAPTION_WORD]] = 10.0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_florence(folder: Path) -> Path:
    from transformers import (
        BartConfig,
        BartTokenizer,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )

    tokens = ["<s>", "<pad>", "</s>", "<unk>", *_byte_symbols(), "Ġ" + CAPTION_WORD]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = BartTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    # 64 px through strides 4·2·2·2 leaves 2×2 patches, plus one pooled token: 5 image tokens.
    image_processor = CLIPImageProcessorPil(size={"height": 64, "width": 64}, do_center_crop=False,
                                            image_seq_length=5)
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    vision = Florence2VisionConfig(depths=(1, 1, 1, 1), embed_dim=(8, 16, 16, 32), num_heads=(1, 1, 1, 1),
                                   num_groups=(1, 1, 1, 1), projection_dim=32, window_size=2, drop_path_rate=0.0)
    text = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                      max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      decoder_start_token_id=tokenizer.eos_token_id)
    config = Florence2Config(vision_config=vision.to_dict(), text_config=text.to_dict(),
                             image_token_id=tokenizer.image_token_id)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(config)
    word_id = vocab["Ġ" + CAPTION_WORD]
    with torch.no_grad():
        # The head is tied to the embeddings and has no bias: make the decoder's last output the word's embedding,
        # long enough to beat every other token (end of text included).
        embeddings = model.get_input_embeddings().weight
        embeddings[word_id] = embeddings[word_id] / embeddings[word_id].norm() * 10.0
        last_norm = model.model.language_model.decoder.layers[-1].final_layer_norm
        last_norm.weight.zero_()
        last_norm.bias.copy_(embeddings[word_id])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "tiny.json").write_text(json.dumps({"caption_word": CAPTION_WORD}))
    return folder
